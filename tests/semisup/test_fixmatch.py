"""Confidence masking and CutMix of the semi-supervised base."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from components.semisup.fixmatch import (
    CUTMIX_AREA,
    CUTMIX_RATIO,
    box_from_uniforms,
    box_mask,
    confident_ce,
    cutmix,
    cutmix_boxes,
    pseudo_labels,
)


def test_confidence_mask_is_exactly_the_confident_pixels():
    # Two classes; logit difference d gives confidence sigmoid(|d|).
    d = torch.tensor([[0.0, 1.0], [3.0, -4.0]])  # conf 0.5, 0.731, 0.953, 0.982
    logits = torch.stack([torch.zeros_like(d), d])[None]  # (1, 2, 2, 2): class 1 minus class 0 = d
    labels, conf, mask = pseudo_labels(logits, threshold=0.95)
    np.testing.assert_allclose(conf[0].numpy(), 1 / (1 + np.exp(-np.abs(d.numpy()))), rtol=1e-6)
    assert mask[0].tolist() == [[False, False], [True, True]]
    assert labels[0].tolist() == [[0, 1], [1, 0]]  # ties go to the first class


def test_pseudo_labels_upsample_to_the_image():
    logits = torch.randn(2, 3, 4, 4)
    labels, conf, mask = pseudo_labels(logits, 0.5, size=(8, 8))
    assert labels.shape == conf.shape == mask.shape == (2, 8, 8)


def test_confident_ce_divides_by_the_real_pixels():
    # UniMatch (LiheYoung/UniMatch@0324f3d unimatch.py L176-178): sum over confident real pixels
    # of the CE, divided by the real (non-padding, ignore_mask != 255) pixels. Uniform logits over
    # 2 classes: CE = ln 2 per pixel. Four pixels, the last is crop padding (and "confident", which
    # must not count); pixels 0 and 2 are confident: 2 ln 2 / 3 = 0.4621 (dividing by all four
    # pixels, as before, gives 2 ln 2 / 4 = 0.3466).
    logits = torch.zeros(1, 2, 1, 4)
    labels = torch.zeros(1, 1, 4, dtype=torch.long)
    confident = torch.tensor([[[True, False, True, True]]])
    area = torch.tensor([[[True, True, True, False]]])
    value = float(confident_ce(logits, labels, confident, area))
    assert value == pytest.approx(2 * math.log(2) / 3)
    assert value != pytest.approx(2 * math.log(2) / 4)
    assert float(confident_ce(logits, labels, torch.zeros_like(confident), area)) == 0.0
    assert float(confident_ce(logits, labels, confident, torch.zeros_like(area))) == 0.0


def test_cutmix_keeps_image_and_label_aligned():
    # Each image's pixels hold its label, so mixed image == mixed label everywhere.
    labels = torch.stack([torch.full((12, 16), k, dtype=torch.long) for k in range(4)])
    images = labels.float()[:, None].repeat(1, 3, 1, 1)
    # Box edges on multiples of 1/6 (rows) and 1/8 (columns): on the grid at both resolutions.
    boxes = [(1 / 6, 2 / 3, 0.0, 0.5), None, (0.0, 1.0, 0.5, 1.0), (1 / 3, 5 / 6, 0.25, 0.875)]
    mixed_img, mixed_lab = cutmix(images, boxes), cutmix(labels, boxes)
    for c in range(3):
        assert torch.equal(mixed_img[:, c].long(), mixed_lab)
    # Image 0 takes its box from image 3 (roll by one): rows 2..7, columns 0..7.
    expect0 = torch.zeros(12, 16, dtype=torch.long)
    expect0[2:8, 0:8] = 3
    assert torch.equal(mixed_lab[0], expect0)
    assert torch.equal(mixed_lab[1], labels[1])  # no box: untouched
    # The same fractional box at half resolution (features) covers the matching region.
    feats = labels.float()[:, None, ::2, ::2]
    mixed_feat = cutmix(feats, boxes)[:, 0]
    assert torch.equal(mixed_feat.long(), mixed_lab[:, ::2, ::2])


def test_cutmix_boxes_shapes_and_probability():
    g = torch.Generator().manual_seed(0)
    boxes = cutmix_boxes(400, 0.5, g)
    used = [b for b in boxes if b is not None]
    assert 150 < len(used) < 250
    for y0, y1, x0, x1 in used:
        assert 0 <= y0 < y1 <= 1 + 1e-9 and 0 <= x0 < x1 <= 1 + 1e-9
        assert 0.02 - 1e-9 <= (y1 - y0) * (x1 - x0) <= 0.4 + 1e-9
    assert all(b is None for b in cutmix_boxes(10, 0.0, g))
    m = box_mask((0.5, 1.0, 0.0, 0.25), 8, 8)
    assert int(m.sum()) == 4 * 2 and bool(m[4:, :2].all())
    with pytest.raises(ValueError, match="boxes for a batch"):
        cutmix(torch.zeros(2, 4, 4), [None])


def test_cutmix_box_law_is_unimatchs():
    # LiheYoung/UniMatch@0324f3d dataset/transform.py L66-82: s ~ U(0.02, 0.4) (L71), ratio
    # r ~ U(0.3, 1/0.3) uniformly (L73), w = sqrt(s/r), h = sqrt(s·r) (L74-75), corner uniform
    # over the image (L76-77), redrawn until the box fits (L79-80), never clipped.
    # Hand values, all uniforms 0.5 except the corner: s = 0.02 + 0.38·0.5 = 0.21,
    # r = 0.3 + (1/0.3 − 0.3)·0.5 = 1.816667, h = sqrt(0.21·1.816667) = 0.617657,
    # w = sqrt(0.21/1.816667) = 0.339995 (the old log-uniform law gave r = 1, h = w = 0.458258).
    y0, y1, x0, x1 = box_from_uniforms(0.5, 0.5, 0.25, 0.5)
    assert (y0, x0) == (0.25, 0.5)
    assert y1 - y0 == pytest.approx(0.617657, abs=1e-6)
    assert x1 - x0 == pytest.approx(0.339995, abs=1e-6)
    # The same box with its top at 0.5 does not fit (0.5 + 0.6177 > 1): rejected, not moved.
    assert box_from_uniforms(0.5, 0.5, 0.5, 0.5) is None
    # The accepted law: s is drawn once (L71, before the loop), so s ~ U(0.02, 0.4) and, given s,
    # r has density ∝ P(fit) = (1 − h)(1 − w) where both are < 1. The share of tall boxes
    # (r > 1), by numerical integration on a grid, against the sampler's.
    s, r = np.meshgrid(
        np.linspace(*CUTMIX_AREA, 801), np.linspace(*CUTMIX_RATIO, 801), indexing="ij"
    )
    h, w = np.sqrt(s * r), np.sqrt(s / r)
    fit = np.clip(1 - h, 0, None) * np.clip(1 - w, 0, None)
    tall = float(((fit * (r > 1)).sum(1) / fit.sum(1)).mean())  # 0.733; log-uniform law: 0.5
    assert tall == pytest.approx(0.733, abs=0.005)
    boxes = cutmix_boxes(6000, 1.0, torch.Generator().manual_seed(1))
    heights = np.array([b[1] - b[0] for b in boxes])
    widths = np.array([b[3] - b[2] for b in boxes])
    assert np.mean(heights > widths) == pytest.approx(tall, abs=0.025)
    area = heights * widths
    assert area.min() >= CUTMIX_AREA[0] - 1e-9 and area.max() <= CUTMIX_AREA[1] + 1e-9
    assert all(0 <= b[0] and b[1] <= 1 and 0 <= b[2] and b[3] <= 1 for b in boxes)


def test_cutmix_takes_the_box_from_the_partner():
    x = torch.zeros(1, 1, 4, 4)
    other = torch.ones(1, 1, 4, 4)
    # A batch of one rolled is itself: no change. With a partner the box is pasted.
    assert torch.equal(cutmix(x, [(0.0, 0.5, 0.0, 0.5)]), x)
    mixed = cutmix(x, [(0.0, 0.5, 0.0, 0.5)], other)
    assert int(mixed.sum()) == 4 and bool(mixed[0, 0, :2, :2].all())
    with pytest.raises(ValueError, match="partner"):
        cutmix(x, [None], torch.ones(1, 1, 2, 2))
