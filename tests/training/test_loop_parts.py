"""Parts of the Ray worker and the training core that run without Ray workers."""

from __future__ import annotations

import pytest
import torch

from components.training.distributed import mean_terms
from components.training.loop import Streams


def test_terms_are_averaged_over_the_steps_that_reported_them():
    # `loss` in all 4 steps, `pseudo_acc` (a diagnostic) only in 2 of them.
    sums = {"loss": 4.0 + 3.0 + 2.0 + 1.0, "pseudo_acc": 0.5 + 0.7}
    reported = {"loss": 4, "pseudo_acc": 2}
    means = mean_terms(sums, reported, world=1)
    assert means == pytest.approx({"loss": 2.5, "pseudo_acc": 0.6})
    assert mean_terms({}, {}, world=1) == {}


def test_next_batch_prefixes_the_second_stream_and_stops_with_either():
    labeled = iter([{"image": torch.zeros(1)}, {"image": torch.ones(1)}])
    unlabeled = iter([{"image": torch.full((1,), 2.0), "area": torch.ones(1, dtype=torch.bool)}])
    streams = Streams({"": labeled, "u_": unlabeled})
    batch = next(streams)
    assert set(batch) == {"image", "u_image", "u_area"} and float(batch["u_image"]) == 2.0
    assert next(streams, None) is None  # the unlabeled stream ended


def test_optimizer_groups_and_kinds():
    from components.config import ModelConfig, OptimConfig
    from components.models.build import build_model
    from components.training.schedule import Schedule, build_optimizer
    from components.weakly.tscd import TwoViews

    net = TwoViews(
        build_model(ModelConfig(backbone="mit_b0", head="segformer", width=0.25, cls_head=True), 4)
    )
    names = dict(net.named_parameters())
    backbone = {n for n in names if n.startswith("net.backbone.")}
    opt = build_optimizer(net, OptimConfig(name="adamw", lr=6e-5, head_lr_mult=10.0))
    assert isinstance(opt, torch.optim.AdamW)
    (bb, heads) = opt.param_groups
    assert (bb["lr"], heads["lr"]) == (6e-5, pytest.approx(6e-4))
    by_id = {id(p): n for n, p in names.items()}
    assert {by_id[id(p)] for p in bb["params"]} == backbone
    assert {by_id[id(p)] for p in heads["params"]} == set(names) - backbone
    assert "net.classifier.weight" in {by_id[id(p)] for p in heads["params"]}
    # The schedule scales both groups alike: warm-up 2 iterations, then poly.
    schedule = Schedule.of(opt, 10, OptimConfig(poly_power=1.0, warmup_iters=2))
    assert schedule.base_lrs == [6e-5, pytest.approx(6e-4)]  # from the groups' initial_lr
    schedule.apply(opt, 0)
    assert [g["lr"] for g in opt.param_groups] == [3e-5, pytest.approx(3e-4)]
    schedule.apply(opt, 1)
    assert [g["lr"] for g in opt.param_groups] == [6e-5, pytest.approx(6e-4)]
    # One group (and plain SGD) when there is no head multiplier: old checkpoints still load.
    sgd = build_optimizer(net, OptimConfig())
    assert isinstance(sgd, torch.optim.SGD) and len(sgd.param_groups) == 1
