"""A teacher trained by the job lends its last val mIoU to the student run only when it was
measured the way the student run measures it (trainer._same_evaluation_miou)."""

from __future__ import annotations

import dataclasses

from components.config import Config, EvalConfig, to_dict
from components.training.checkpoint import save_checkpoint
from components.training.trainer import Outcome, _same_evaluation_miou


def _outcome(tmp_path, cfg: Config, miou: float) -> Outcome:
    folder = tmp_path / "teacher" / "epoch_0010"
    meta = {"config": to_dict(cfg), "num_classes": 5, "progress": {"iteration": 1}}
    save_checkpoint(folder, {}, None, {**meta, "metrics": {"miou": miou}})
    return Outcome("teacher", {"miou": miou}, str(folder), 1.0)


def test_the_teacher_mIoU_is_reused_only_under_the_same_evaluation(tmp_path):
    cfg = Config()
    assert _same_evaluation_miou(cfg, _outcome(tmp_path, cfg, 0.4)) == 0.4
    slide = dataclasses.replace(cfg, eval=EvalConfig(mode="slide"))
    assert _same_evaluation_miou(slide, _outcome(tmp_path, cfg, 0.4)) is None
    other = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_split="test"))
    assert _same_evaluation_miou(other, _outcome(tmp_path, cfg, 0.4)) is None
    assert _same_evaluation_miou(cfg, _outcome(tmp_path, cfg, -1.0)) is None  # not evaluated
