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


class _Linear:
    """A minimal method: loss = mean(w * image) * scale, scale set per call (inf / nan)."""

    def __init__(self):
        self.trainable = torch.nn.Linear(1, 1, bias=False)
        self.scales: list[float] = []

    def training_step(self, batch):
        scale = self.scales.pop(0) if self.scales else 1.0
        return {"loss": (self.trainable.weight * batch["image"]).mean() * scale}

    def after_step(self):
        pass


def _epoch(method, batches, **kwargs):
    from components.config import OptimConfig
    from components.training.core import train_one_epoch
    from components.training.schedule import Schedule, build_optimizer

    optimizer = build_optimizer(method.trainable, OptimConfig(lr=0.1))
    schedule = Schedule.of(optimizer, 10, OptimConfig(lr=0.1))
    return train_one_epoch(method, iter(batches), optimizer, schedule, {"iteration": 0}, 10,
                           **kwargs)  # fmt: skip


def test_a_non_finite_loss_stops_the_epoch_at_once():
    from components.training.core import NonFiniteLossError

    method = _Linear()
    method.scales = [1.0, 1.0, float("inf")]
    batches = [{"image": torch.ones(2, 1)} for _ in range(5)]
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at iteration 3 \(loss -?inf\)"):
        _epoch(method, batches)


def test_bad_rows_stop_as_soon_as_the_epoch_limit_is_exceeded():
    from components.training.core import BadDataError

    good = {"image": torch.ones(4, 1), "valid": torch.ones(4, dtype=torch.bool)}
    bad = {"image": torch.ones(4, 1), "valid": torch.tensor([False, False, True, True])}
    seen = []
    with pytest.raises(BadDataError, match=r"4 bad training rows \(.*\) after 2 steps"):
        _epoch(_Linear(), [bad, bad, good, good], max_bad_rows=3,
               on_step=lambda it, v, w: seen.append(it))  # fmt: skip
    assert seen == [1]  # the second step's rows crossed the limit: no step logged after it
    stats = _epoch(_Linear(), [bad, good, good], max_bad_rows=3)
    assert stats.steps == 3 and stats.bad_rows == 2


def test_sync_batch_norm_on_gpu_only_and_checkpoints_still_load():
    """trainer.sync_bn: converted when asked (None: on GPUs); torch's SyncBatchNorm runs on GPUs
    only, so on CPU nothing is converted. Its state_dict is the plain model's (model.pt loads)."""
    from components.config import ModelConfig
    from components.models.build import build_model
    from components.training.loop import sync_batch_norm

    def kinds(m):
        return {type(x).__name__ for x in m.modules() if "BatchNorm" in type(x).__name__}

    assert kinds(sync_batch_norm(build_model(ModelConfig(width=0.125), 3), None, False)) == {
        "BatchNorm2d"
    }
    assert kinds(sync_batch_norm(build_model(ModelConfig(width=0.125), 3), True, False)) == {
        "BatchNorm2d"
    }
    plain = build_model(ModelConfig(width=0.125), 3)
    synced = sync_batch_norm(build_model(ModelConfig(width=0.125), 3), None, True)
    assert kinds(synced) == {"SyncBatchNorm"}
    assert sync_batch_norm(build_model(ModelConfig(width=0.125), 3), False, True) is not None
    assert kinds(sync_batch_norm(build_model(ModelConfig(width=0.125), 3), False, True)) == {
        "BatchNorm2d"
    }
    plain.load_state_dict(synced.state_dict())  # same keys and shapes
