"""Helpers of the training loop that run without Ray workers."""

from __future__ import annotations

import pytest
import torch

from components.training.loop import _mean_terms, _next_batch


def test_terms_are_averaged_over_the_steps_that_reported_them():
    # `loss` in all 4 steps, `pseudo_acc` (a diagnostic) only in 2 of them.
    sums = {"loss": 4.0 + 3.0 + 2.0 + 1.0, "pseudo_acc": 0.5 + 0.7}
    reported = {"loss": 4, "pseudo_acc": 2}
    means = _mean_terms(sums, reported, world=1)
    assert means == pytest.approx({"loss": 2.5, "pseudo_acc": 0.6})
    assert _mean_terms({}, {}, world=1) == {}


def test_next_batch_prefixes_the_second_stream_and_stops_with_either():
    labeled = iter([{"image": torch.zeros(1)}, {"image": torch.ones(1)}])
    unlabeled = iter([{"image": torch.full((1,), 2.0), "area": torch.ones(1, dtype=torch.bool)}])
    streams = {"": labeled, "u_": unlabeled}
    batch = _next_batch(streams)
    assert set(batch) == {"image", "u_image", "u_area"} and float(batch["u_image"]) == 2.0
    assert _next_batch(streams) is None  # the unlabeled stream ended
