"""Confidence masking and CutMix of the semi-supervised base."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from components.semisup.fixmatch import (
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


def test_confident_ce_averages_over_all_pixels():
    logits = torch.zeros(1, 2, 1, 2)  # uniform: CE = ln 2 per pixel
    labels = torch.zeros(1, 1, 2, dtype=torch.long)
    mask = torch.tensor([[[True, False]]])
    assert float(confident_ce(logits, labels, mask)) == pytest.approx(math.log(2) / 2)
    assert float(confident_ce(logits, labels, torch.zeros_like(mask))) == 0.0


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
