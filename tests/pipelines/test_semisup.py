"""End-to-end runs of pipelines/semisup.py on the shared local Ray instance."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from components.training.checkpoint import load_full_state, read_meta, resolve_checkpoint
from pipelines import evaluate, semisup


@pytest.fixture(scope="module")
def semisup_data(tmp_path_factory):
    """4 classes, 32 px: 8 labeled, 24 unlabeled (with masks, for diagnostics), 8 val rows."""
    from components.config import SyntheticConfig
    from components.data.synthetic import ensure_synthetic

    root = tmp_path_factory.mktemp("semisup") / "synthetic"
    cfg = SyntheticConfig(num_train=8, num_unlabeled=24, num_val=8, size=32, num_classes=4, seed=2)
    ensure_synthetic(str(root), cfg)
    return str(root)


def _args(tiny_overrides, root: str, storage, **extra: str) -> list[str]:
    """One run (a --config: no baselines) of the tiny dataset. Threshold 0.3: a barely trained
    4-class teacher is rarely 95% sure; this exercises `unsup`."""
    extra = {
        "method.semisup.threshold": "0.3",
        "method.semisup.style_memory_momentum": "0.9",
        **extra,
    }
    overrides = tiny_overrides(root, str(storage), **extra)
    return [
        "--config",
        str(Path(__file__).parents[2] / "configs" / "cross_image_synthetic.yaml"),
        *[a for a in overrides if not a.startswith("teacher.")],
    ]


def _run(storage, prefix: str):
    (run,) = [p for p in storage.iterdir() if p.name.startswith(prefix)]
    return run


@pytest.mark.slow
def test_two_workers_labeled_count_then_resume_with_the_same_ema_teacher(
    ray_session, semisup_data, tiny_overrides, tmp_path, capsys
):
    storage = tmp_path / "out"
    extra = {
        # 4 of the 8 'train' rows keep their labels; the unlabeled stream is the 24 'unlabeled'
        # rows plus the other 4 'train' rows: (28 // 2 workers) // batch 2 = 7 steps per epoch.
        "data.labeled_count": "4",
        "data.batch_size": "2",
        "trainer.num_workers": "2",
    }
    args = _args(tiny_overrides, semisup_data, storage, **extra)
    assert semisup.main(args) == 0
    out = capsys.readouterr().out
    expected = "4 labeled rows ('train'), 28 unlabeled rows ('unlabeled' + the rest of 'train')"
    assert f"{expected}; 7 steps per epoch" in out
    run = _run(storage, "semisup-cross_image")
    meta = read_meta(resolve_checkpoint(run))
    m = meta["metrics"]
    assert meta["progress"]["iteration"] == 7 and m["world_size"] == 2 and m["bad_rows"] == 0
    for term in ("ce", "unsup", "relation", "style", "confident_share"):
        assert term in m, term
    assert 0.0 <= m["confident_share"] <= 1.0 and 0.0 <= m["miou"] <= 1.0
    first, _ = load_full_state(resolve_checkpoint(run))
    assert first["method"]["ema"]["updates"] == 7
    ema_1 = first["method"]["ema"]["model"]

    # evaluate.py reads the checkpoint and agrees with the workers' all-reduced metric.
    assert evaluate.main(["--checkpoint", str(run), "--data", semisup_data]) == 0
    shown = float(re.search(r"mIoU\s+([0-9.]+)", capsys.readouterr().out).group(1))
    assert shown == pytest.approx(100 * m["miou"], abs=0.01)

    # The same command with one more epoch resumes the run: the EMA teacher comes back from
    # the checkpoint (its update count continues from 7, its weights move on from epoch 1's).
    assert semisup.main([*args, "trainer.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "resumed from checkpoint: epoch 1, iteration 7" in out
    second, _ = load_full_state(resolve_checkpoint(run))
    assert second["progress"]["iteration"] == 14
    assert second["method"]["ema"]["updates"] == 14
    assert second["method"]["style_memory"]["mean"] is not None
    assert any(not torch.equal(ema_1[k], second["method"]["ema"]["model"][k]) for k in ema_1)


def test_unimatch_objective_end_to_end(ray_session, semisup_data, tiny_overrides, tmp_path):
    """OHEM on the labeled batch and the halved objective (the Cityscapes protocol's keys,
    issue 21 item 9) reach the workers: one epoch trains and reports every term."""
    storage = tmp_path / "out"
    extra = {
        "method.semisup.labeled_loss": "ohem",
        "method.semisup.ohem_min_kept": "1000",  # of the 4 x 32 x 32 = 4096 labeled pixels
        "method.semisup.loss_scale": "0.5",
    }
    assert semisup.main(_args(tiny_overrides, semisup_data, storage, **extra)) == 0
    m = read_meta(resolve_checkpoint(_run(storage, "semisup-cross_image")))["metrics"]
    for term in ("ce", "unsup", "relation", "style"):
        assert term in m and m[term] >= 0.0, term
    assert 0.0 <= m["miou"] <= 1.0


def test_comparison_runs_as_many_steps():
    """--baselines / the embedded default: supervised-only repeats the labeled rows per epoch."""
    from components.regimes import SEMI_SUPERVISED
    from pipelines.semisup import comparison, default_config

    cfg = default_config()  # 64 labeled, 448 unlabeled, batch 8: 56 steps per epoch
    runs = dict(comparison(cfg, labeled_rows=64, steps_per_epoch=56))
    assert list(runs) == ["supervised only", "base (fixmatch)", "base + cross_image"]
    sup = runs["supervised only"]
    assert sup.method.name == "none" and sup.data.train_repeat == 7  # 7 x 64 / 8 = 56 steps
    assert sup.trainer.epochs == cfg.trainer.epochs
    assert runs["base (fixmatch)"].method.name == "fixmatch"
    assert runs["base + cross_image"] is cfg
    # The base trains the base's terms, even when the config spells the method's out.
    spelled = dataclasses.replace(
        cfg.method.semisup, weights={"ce": 1.0, "aux": 0.4, "unsup": 1.0, "relation": 2.0}
    )
    cfg2 = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, semisup=spelled))
    base = dict(comparison(cfg2, 64, 56))["base (fixmatch)"]
    assert SEMI_SUPERVISED.weights(base) == {"ce": 1.0, "aux": 0.4, "unsup": 1.0}
    assert SEMI_SUPERVISED.weights(cfg2)["relation"] == 2.0
    only_base = comparison(
        dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, name="fixmatch")), 64, 56
    )
    assert [label for label, _ in only_base] == ["supervised only", "base (fixmatch)"]


def test_report_table():
    from components.training.trainer import Outcome
    from pipelines.semisup import report

    m = {"miou": 0.5, "best_miou": 0.55, "best_epoch": 2, "iteration": 12}
    semi = {**m, "confident_share": 0.25, "pseudo_acc": 0.9}
    text = report(
        [
            ("supervised only", None, "a", Outcome("a", m, None, 10.0)),
            ("base + cross_image", None, "b", Outcome("b", semi, None, 20.0)),
        ],
        "/runs",
    )
    lines = text.splitlines()
    assert lines[1].split() == ["supervised", "only", "50.00", "55.00", "(2)", "12", "-", "-", "10"]
    assert lines[2].split()[3:] == ["50.00", "55.00", "(2)", "12", "25.00", "90.00", "20"]
    assert "base + cross_image: /runs/b" in text


def test_bad_inputs_fail_before_training(
    ray_session, semisup_data, tiny_overrides, tmp_path, capsys
):
    storage = tmp_path / "out"
    base = _args(tiny_overrides, semisup_data, storage)
    assert semisup.main([*base, "data.labeled_count=100"]) == 2
    assert "data.labeled_count=100 but" in capsys.readouterr().err
    assert semisup.main([*base, "data.unlabeled_split=extra"]) == 2
    assert "no unlabeled images" in capsys.readouterr().err
    assert semisup.main([*base, "method.name=sstkd"]) == 2
    assert "sstkd is supervised; run it with pipelines/distill.py" in capsys.readouterr().err
    assert semisup.main([*base, "method.semisup.strong=[mixup]"]) == 2
    assert "method.semisup.strong" in capsys.readouterr().err
    # UniMatch's OHEM at its Cityscapes min_kept (200000) on 4 crops of 32 px (4096 pixels):
    # it could never select, so the run is refused before Ray trains anything.
    assert semisup.main([*base, "method.semisup.labeled_loss=ohem"]) == 2
    err = capsys.readouterr().err
    assert "'method.semisup.ohem_min_kept': 200000 is more than the 4096 pixels" in err
    assert semisup.main([*base, "method.semisup.loss_scale=0"]) == 2
    assert "method.semisup.loss_scale" in capsys.readouterr().err
    assert not storage.exists() or not any(storage.rglob("meta.json"))


def test_distill_refuses_semisup_methods(capsys):
    from pipelines import distill

    assert distill.main(["method.name=cross_image"]) == 2
    assert "pipelines/semisup.py" in capsys.readouterr().err
