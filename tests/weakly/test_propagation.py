"""AFA's label propagation by the learned affinity (random walk with a background score)."""

from __future__ import annotations

import math

import torch

from components.config import Config, MethodConfig, ModelConfig, WeaklyConfig
from components.distillation.build import build_method
from components.models.build import build_model
from components.weakly.affinity import propagate_with_background
from components.weakly.pseudo_labels import propagated_pseudo_labels


def _softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def test_propagation_by_hand_on_two_positions():
    # rulixiang/afa utils/camutils.py propagte_aff_cam_with_bkg: T = aff ** 2, columns divided by
    # their sum + 0.1, scores = softmax over [background, present classes], out = scores @ T.
    # A 1x2 map, aff = [[1, 0.5], [0.5, 1]]: T = [[1, .25], [.25, 1]] / 1.35 (both columns).
    cams = torch.tensor([[[[0.8, 0.2]], [[0.9, 0.9]]]])  # classes 1 and 2; class 2 absent
    aff = torch.tensor([[[1.0, 0.5], [0.5, 1.0]]])
    labels = torch.tensor([[1.0, 0.0]])
    out = propagate_with_background(cams, aff, labels, background=0.5, radius=8)
    s0, s1 = _softmax([0.5, 0.8]), _softmax([0.5, 0.2])  # [bg, class 1] at the two positions
    expected = torch.tensor(
        [
            [(s0[0] * 1 + s1[0] * 0.25) / 1.35, (s0[0] * 0.25 + s1[0] * 1) / 1.35],
            [(s0[1] * 1 + s1[1] * 0.25) / 1.35, (s0[1] * 0.25 + s1[1] * 1) / 1.35],
            [0.0, 0.0],
        ]
    )
    assert out.shape == (1, 3, 1, 2)
    torch.testing.assert_close(out[0, :, 0], expected)


def test_propagation_radius_is_inclusive():
    # AFA's get_mask_by_radius keeps |Δy| <= r and |Δx| <= r. On a 1x3 map with r = 1 the pair
    # (0, 2) is cut; with all affinities 1: T columns [1, 1, 0] / 2.1, [1, 1, 1] / 3.1, ...
    cams = torch.tensor([[[[1.0, 0.0, 0.0]]]])
    aff = torch.ones(1, 3, 3)
    out = propagate_with_background(cams, aff, torch.ones(1, 1), background=0.0, radius=1)
    fg = _softmax([0.0, 1.0])[1], 0.5, 0.5  # class-1 share at each position before the walk
    expected = [(fg[0] + fg[1]) / 2.1, sum(fg) / 3.1, (fg[1] + fg[2]) / 2.1]
    torch.testing.assert_close(out[0, 1, 0], torch.tensor(expected))


def test_propagated_labels_combine_high_and_low():
    # Scores [bg, class 1] at 3 pixels; high: bg, bg, fg; low: bg, fg, fg -> 0, ignore, 1.
    high = torch.tensor([[[[0.9, 0.6, 0.1]], [[0.1, 0.4, 0.9]]]])
    low = torch.tensor([[[[0.9, 0.3, 0.1]], [[0.1, 0.7, 0.9]]]])
    area = torch.tensor([[[True, True, True]]])
    out = propagated_pseudo_labels(high, low, torch.ones(1, 1), area=area)
    assert out.tolist() == [[[0, 255, 1]]]


def _method(propagate_after):
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            backbone="mit_b0",
            head="segformer",
            width=0.25,
            output_stride=8,
            cls_head=True,
            drop_path=0.0,
        ),
        4,
    )
    weakly = WeaklyConfig(
        weights={"scd": 0.0},  # not needed here; keeps the test fast
        cam_flip=False,
        warmup_iters=0,
        refine_iterations=2,
        propagate_after=propagate_after,
    )
    return build_method(Config(method=MethodConfig(name="tscd", weakly=weakly)), model, None, 4)


def _batch():
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(2, 3, 64, 64, generator=g),
        "labels": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
        "area": torch.ones(2, 64, 64, dtype=torch.bool),
        "valid": torch.ones(2, dtype=torch.bool),
    }


def test_affinity_method_matches_the_training_output():
    net = _method(None).trainable.net
    x = _batch()["image"]
    with torch.no_grad():
        train_pred = net(x)["attn_pred"]
        aff, size = net.eval().affinity(x)
    assert size == (8, 8)
    torch.testing.assert_close(aff, train_pred)


def test_tscd_switches_to_propagated_labels_after_the_iteration():
    method = _method(propagate_after=0)  # AFA: `if n_iter <= 6000` keeps the CAM labels
    first = method.training_step(_batch())
    assert "propagated_share" not in first  # step 0: not yet
    second = method.training_step(_batch())
    assert "propagated_share" in second and torch.isfinite(second["loss"])
    assert 0 < float(second["propagated_share"]) <= 1
    second["loss"].backward()
    off = _method(propagate_after=None)
    off.iteration = 10**6
    assert "propagated_share" not in off.training_step(_batch())
    assert WeaklyConfig().propagate_after == 6000  # AFA's default
