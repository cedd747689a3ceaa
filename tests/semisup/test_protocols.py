"""The real-data semi-supervised configs against UniMatch's protocols (issue 21, item 9).

Values read from LiheYoung/UniMatch@0324f3d: configs/cityscapes.yaml, configs/pascal.yaml and
the training loop fixmatch.py (optimizer L57-59, loss L166, poly schedule L181-184)."""

from __future__ import annotations

import pytest

from components.config import load_config
from components.regimes import SEMI_SUPERVISED


def _load(name: str):
    return load_config(["--config", f"configs/{name}.yaml", "model.pretrained=null"])


def _common(cfg) -> None:
    d, o, s = cfg.data, cfg.optim, cfg.method.semisup
    # batch_size: 2 per GPU x 4 GPUs, labeled and unlabeled alike (fixmatch.py L84-88)
    assert (d.batch_size, d.unlabeled_batch_size, cfg.trainer.num_workers) == (2, 2, 4)
    assert (d.scale_min, d.scale_max) == (0.5, 2.0)  # dataset/semi.py L41
    assert (o.name, o.momentum, o.weight_decay, o.poly_power, o.warmup_iters) == (
        "sgd", 0.9, 1e-4, 0.9, 0
    )  # fmt: skip
    assert cfg.model.backbone == "resnet101" and cfg.model.output_stride == 16
    assert s.loss_scale == 0.5  # loss = (loss_x + loss_u) / 2.0
    assert s.cutmix_prob == 0.5  # dataset/semi.py L55: obtain_cutmix_box(p=0.5)


def test_cityscapes_follows_unimatchs_cityscapes_yaml():
    cfg = _load("cross_image_cityscapes_744_r101")
    _common(cfg)
    s = cfg.method.semisup
    assert cfg.data.crop_size == 801 and cfg.trainer.epochs == 240  # L4, L8
    assert (cfg.optim.lr, cfg.optim.head_lr_mult) == (0.005, 1.0)  # L10-11
    assert (s.labeled_loss, s.ohem_threshold, s.ohem_min_kept) == ("ohem", 0.7, 200000)  # L12-17
    assert s.threshold == 0.0  # L18
    # min_kept is per worker (UniMatch: per GPU) and fits this worker's labeled batch.
    assert s.ohem_min_kept <= cfg.data.batch_size * 801 * 801
    assert (cfg.eval.mode, cfg.eval.crop, cfg.eval.stride) == ("slide", [801, 801], [534, 534])
    # The cross-image weights keep their ratio to the base; relation 0.01 is the former 1 x τ².
    weights = SEMI_SUPERVISED.weights(cfg)
    assert (weights["relation"], weights["style"]) == (0.01, 0.1)


def test_voc_follows_unimatchs_pascal_yaml():
    cfg = _load("cross_image_voc_1464_r101")
    _common(cfg)
    s = cfg.method.semisup
    assert cfg.data.crop_size == 321 and cfg.trainer.epochs == 80  # L4, L8
    assert cfg.optim.lr == 0.001 and cfg.optim.head_lr_mult == 10.0  # L10-11
    assert cfg.optim.lr * cfg.optim.head_lr_mult == pytest.approx(0.01)
    assert s.labeled_loss == "ce" and s.threshold == 0.95  # L12-16
    assert cfg.eval.mode == "whole"  # unimatch.py L222: 'original' outside Cityscapes


def test_synthetic_default_keeps_the_old_objective():
    cfg = _load("cross_image_synthetic")
    s = cfg.method.semisup
    assert (s.labeled_loss, s.loss_scale, s.threshold) == ("ce", 1.0, 0.95)
