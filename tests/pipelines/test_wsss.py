"""End-to-end runs of pipelines/wsss.py on the shared local Ray instance."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from components.training.checkpoint import load_full_state, read_meta, resolve_checkpoint
from pipelines import evaluate, wsss


@pytest.fixture(scope="module")
def wsss_data(tmp_path_factory):
    """4 classes, 64 px (MiT at output stride 8 gives 8x8 CAMs): 16 train, 8 val rows."""
    from components.config import SyntheticConfig
    from components.data.synthetic import ensure_synthetic

    root = tmp_path_factory.mktemp("wsss") / "synthetic"
    cfg = SyntheticConfig(num_train=16, num_val=8, size=64, num_classes=4, seed=3)
    ensure_synthetic(str(root), cfg)
    return str(root)


def _args(root: str, storage, **extra: str) -> list[str]:
    overrides = {
        "data.root": root,
        "data.generate_synthetic": "false",
        "data.batch_size": "4",
        "data.val_batch_size": "8",
        "data.prefetch_batches": "1",
        "model.width": "0.25",
        "model.pretrained": "null",  # the shipped config pretrains its encoder (minutes)
        "method.weakly.warmup_iters": "2",  # 4 steps per epoch: the dense terms from step 3
        "method.weakly.refine_iterations": "2",
        "method.weakly.scd_points": "64",
        "trainer.epochs": "1",
        "trainer.storage_path": str(storage),
        "trainer.log_every": "1000",
        **extra,
    }
    config = str(Path(__file__).parents[2] / "configs" / "tscd_synthetic.yaml")
    return ["--config", config, "--diagnose-rows", "8", *[f"{k}={v}" for k, v in overrides.items()]]


@pytest.mark.slow
def test_tscd_run_report_evaluate_resume(ray_session, wsss_data, tmp_path, capsys):
    storage = tmp_path / "out"
    assert wsss.main(_args(wsss_data, storage)) == 0
    out = capsys.readouterr().out
    (run,) = [p for p in storage.iterdir() if p.name.startswith("wsss-tscd-mit_b0")]
    meta = read_meta(resolve_checkpoint(run))
    m = meta["metrics"]
    assert meta["progress"]["iteration"] == 4 and m["bad_rows"] == 0
    for term in ("cls", "seg", "aff", "scd", "pseudo_share"):
        assert term in m, term
    for line in ("val segmentation mIoU", "train CAM mIoU", "train pseudo mIoU", "mAP"):
        assert line in out, line
    state, _ = load_full_state(resolve_checkpoint(run))
    assert state["method"] == {"iteration": 4}

    # evaluate.py reads the checkpoint (MiT + SegFormer + classifier) and agrees with the run.
    assert evaluate.main(["--checkpoint", str(run), "--data", wsss_data]) == 0
    shown = float(re.search(r"mIoU\s+([0-9.]+)", capsys.readouterr().out).group(1))
    assert shown == pytest.approx(100 * m["miou"], abs=0.01)

    # The same command again: the finished run is reused, not retrained.
    assert wsss.main(_args(wsss_data, storage)) == 0
    assert "had already finished" in capsys.readouterr().out


def test_refuses_other_methods_and_bad_config(tmp_path, capsys):
    assert wsss.main(["method.name=kd", f"trainer.storage_path={tmp_path}"]) == 2
    assert "kd is supervised; run it with pipelines/distill.py" in capsys.readouterr().err
    assert wsss.main(["model.cls_head=false", f"trainer.storage_path={tmp_path}"]) == 2
    assert "model.cls_head" in capsys.readouterr().err
