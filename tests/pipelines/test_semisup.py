"""End-to-end runs of pipelines/semisup.py on the shared local Ray instance."""

from __future__ import annotations

import re

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
    # threshold 0.3: a barely trained 4-class teacher is rarely 95% sure; this exercises `unsup`.
    extra = {
        "method.semisup.threshold": "0.3",
        "method.semisup.style_memory_momentum": "0.9",
        **extra,
    }
    return [a for a in tiny_overrides(root, str(storage), **extra) if not a.startswith("teacher.")]


def _run(storage, prefix: str):
    (run,) = [p for p in storage.iterdir() if p.name.startswith(prefix)]
    return run


@pytest.mark.slow
def test_comparison_then_resume_with_the_same_ema_teacher(
    ray_session, semisup_data, tiny_overrides, tmp_path, capsys
):
    storage = tmp_path / "out"
    args = _args(tiny_overrides, semisup_data, storage)
    assert semisup.main(["--baselines", *args]) == 0
    out = capsys.readouterr().out
    assert "8 labeled rows ('train'), 24 unlabeled rows ('unlabeled'); 6 steps per epoch" in out
    for label in ("supervised only", "base (fixmatch)", "base + cross_image"):
        assert label in out, label

    # Every run made the same number of steps: 24 unlabeled rows / batch 4 = 6 per epoch; the
    # supervised-only run needs 3 epochs of its 8 labeled rows for that.
    runs = {
        p: _run(storage, p)
        for p in ("semisup-supervised-none", "semisup-fixmatch", "semisup-cross_image")
    }
    for prefix, run in runs.items():
        assert read_meta(resolve_checkpoint(run))["progress"]["iteration"] == 6, prefix
    run = runs["semisup-cross_image"]
    meta = read_meta(resolve_checkpoint(run))
    m = meta["metrics"]
    for term in ("ce", "unsup", "relation", "style", "confident_share", "pseudo_acc"):
        assert term in m, term
    assert 0.0 < m["confident_share"] <= 1.0 and 0.0 <= m["miou"] <= 1.0
    assert "relation" not in read_meta(resolve_checkpoint(runs["semisup-fixmatch"]))["metrics"]
    first, _ = load_full_state(resolve_checkpoint(run))
    assert first["method"]["ema"]["updates"] == 6
    ema_1 = first["method"]["ema"]["model"]

    # evaluate.py reads the checkpoint and agrees with the workers' metric.
    assert evaluate.main(["--checkpoint", str(run), "--data", semisup_data]) == 0
    shown = float(re.search(r"mIoU\s+([0-9.]+)", capsys.readouterr().out).group(1))
    assert shown == pytest.approx(100 * m["miou"], abs=0.01)

    # The same command with one more epoch resumes the run: the EMA teacher comes back from
    # the checkpoint (its update count continues from 6, its weights move on from epoch 1's).
    assert semisup.main([*args, "trainer.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "resumed from checkpoint: epoch 1, iteration 6" in out
    second, _ = load_full_state(resolve_checkpoint(run))
    assert second["progress"]["iteration"] == 12
    assert second["method"]["ema"]["updates"] == 12
    assert second["method"]["style_memory"]["mean"] is not None
    moved = [not torch.equal(ema_1[k], second["method"]["ema"]["model"][k]) for k in ema_1]
    assert any(moved)


@pytest.mark.slow
def test_two_workers_labeled_count_splits_one_dataset(
    ray_session, semisup_data, tiny_overrides, tmp_path, capsys
):
    storage = tmp_path / "out"
    extra = {
        "data.labeled_count": "4",
        "data.unlabeled_split": "none",  # the unlabeled stream is the other 4 'train' rows
        "data.batch_size": "2",
        "method.name": "fixmatch",
        "trainer.num_workers": "2",
    }
    assert semisup.main(_args(tiny_overrides, semisup_data, storage, **extra)) == 0
    out = capsys.readouterr().out
    assert (
        "4 labeled rows ('train'), 4 unlabeled rows (the rest of 'train'); 1 steps per epoch" in out
    )
    meta = read_meta(resolve_checkpoint(_run(storage, "semisup-fixmatch")))
    assert meta["progress"]["iteration"] == 1 and meta["metrics"]["world_size"] == 2
    # The two streams together: 2 workers x (2 labeled + 2 unlabeled) rows, none bad.
    assert meta["metrics"]["bad_rows"] == 0


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
    assert "supervised methods run with pipelines/distill.py" in capsys.readouterr().err
    assert semisup.main([*base, "method.semisup.strong=[mixup]"]) == 2
    assert "method.semisup.strong" in capsys.readouterr().err
    assert not storage.exists() or not any(storage.rglob("meta.json"))


def test_distill_refuses_semisup_methods(capsys):
    from pipelines import distill

    assert distill.main(["method.name=cross_image"]) == 2
    assert "pipelines/semisup.py" in capsys.readouterr().err
