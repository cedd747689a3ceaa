"""Affinity from attention: radius mask, pair labels and the affinity loss vs brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.weakly.affinity import (
    affinity_labels,
    affinity_loss,
    downsample_labels,
    radius_mask,
)

IGN = 255


def brute_radius_mask(h: int, w: int, radius: int) -> np.ndarray:
    n = h * w
    m = np.zeros((n, n), dtype=bool)
    for i in range(n):
        for j in range(n):
            m[i, j] = abs(i // w - j // w) < radius and abs(i % w - j % w) < radius
    return m


@pytest.mark.parametrize("h, w, radius", [(5, 7, 2), (4, 4, 1), (3, 6, 8)])
def test_radius_mask_matches_brute_force(h, w, radius):
    got = radius_mask(h, w, radius)
    expected = brute_radius_mask(h, w, radius)
    assert got.dtype == torch.bool and got.shape == (h * w, h * w)
    assert int(got.sum()) == int(expected.sum())
    np.testing.assert_array_equal(got.numpy(), expected)
    assert torch.equal(got, got.T) and got.diagonal().all()


def test_radius_mask_count_by_formula():
    # Per axis, the number of ordered pairs with |Δ| < r on a line of n is n + 2·Σ_{k=1}^{r−1}(n−k).
    def axis(n: int, r: int) -> int:
        return n + 2 * sum(n - k for k in range(1, min(r, n)))

    assert int(radius_mask(5, 7, 2).sum()) == axis(5, 2) * axis(7, 2) == 13 * 19


def test_affinity_labels_match_brute_force():
    labels = torch.tensor(
        [
            [[0, 0, 1, 1], [0, IGN, 1, 1], [2, 2, 0, 1], [2, 2, 0, 0]],
            [[3, 3, 3, 3], [3, 0, 0, 3], [3, 0, 0, 3], [IGN, 3, 3, 3]],
        ]
    )
    radius = 2
    got = affinity_labels(labels, radius=radius)
    assert got.dtype == torch.int64 and got.shape == (2, 16, 16)
    for b in range(2):
        flat = labels[b].flatten().tolist()
        expected = np.zeros((16, 16), dtype=np.int64)
        for i in range(16):
            for j in range(16):
                near = abs(i // 4 - j // 4) < radius and abs(i % 4 - j % 4) < radius
                if flat[i] == IGN or flat[j] == IGN or not near:
                    expected[i, j] = IGN
                else:
                    expected[i, j] = int(flat[i] == flat[j])
        np.testing.assert_array_equal(got[b].numpy(), expected)
    # The ignore pixel (1, 1) = index 5 ignores its whole row and column.
    assert (got[0, 5] == IGN).all() and (got[0, :, 5] == IGN).all()


def test_downsample_labels_is_nearest():
    g = torch.Generator().manual_seed(0)
    full = torch.randint(0, 4, (2, 8, 12), generator=g)
    full[0, 0, 0] = IGN
    small = downsample_labels(full, (4, 3))
    assert small.dtype == torch.int64 and small.shape == (2, 4, 3)
    # Nearest with integer factors picks rows 0, 2, 4, 6 and columns 0, 4, 8.
    np.testing.assert_array_equal(small.numpy(), full.numpy()[:, ::2, ::4])
    assert small[0, 0, 0] == IGN  # 255 survives as 255, never blended


def _tiny_example():
    # Pixels: 0 -> bg, 1 -> bg, 2 -> class 1, 3 -> ignore (one image, radius covers all).
    seeds = torch.tensor([[0, 0, 1, IGN]])
    labels = affinity_labels(seeds.view(1, 2, 2), radius=2)
    pred = torch.tensor(
        [
            [
                [0.9, 0.8, 0.3, 0.5],
                [0.7, 0.6, 0.2, 0.5],
                [0.1, 0.4, 0.95, 0.5],
                [0.5, 0.5, 0.5, 0.5],
            ]
        ]
    )
    return pred, labels, seeds


def test_affinity_loss_by_hand():
    pred, labels, seeds = _tiny_example()
    # bg positives: (0,0) .9, (0,1) .8, (1,0) .7, (1,1) .6 -> Σ(1−p) = 1.0, count 4
    # fg positives: (2,2) .95 -> Σ(1−p) = 0.05, count 1
    # negatives: (0,2) .3, (1,2) .2, (2,0) .1, (2,1) .4 -> Σp = 1.0, count 4
    expected = 0.25 * 1.0 / 5 + 0.25 * 0.05 / 2 + 0.5 * 1.0 / 5
    assert float(affinity_loss(pred, labels, seeds)) == pytest.approx(expected, rel=1e-6)
    # Seeds as (B, h, w) give the same.
    assert float(affinity_loss(pred, labels, seeds.view(1, 2, 2))) == pytest.approx(expected)
    # Without seeds: AFA's released form, positives pooled (Σ(1−p) = 1.05 over 5 pairs).
    unsplit = 0.5 * 1.05 / 6 + 0.5 * 1.0 / 5
    assert float(affinity_loss(pred, labels)) == pytest.approx(unsplit, rel=1e-6)


def test_affinity_loss_gradient_reaches_pred_only_on_labelled_pairs():
    pred, labels, seeds = _tiny_example()
    pred = pred.clone().requires_grad_(True)
    affinity_loss(pred, labels, seeds).backward()
    expected = torch.zeros(1, 4, 4)
    expected[0, :2, :2] = -0.25 / 5  # bg positives
    expected[0, 2, 2] = -0.25 / 2  # the fg positive
    expected[0, [0, 1, 2, 2], [2, 2, 0, 1]] = 0.5 / 5  # negatives
    np.testing.assert_allclose(pred.grad.numpy(), expected.numpy(), rtol=1e-6)
    assert not labels.requires_grad and not seeds.requires_grad  # int tensors: no graph


def test_affinity_loss_is_zero_for_a_perfect_prediction_and_checks_shapes():
    seeds = torch.tensor([[0, 1, 1, 2]])
    labels = affinity_labels(seeds.view(1, 2, 2), radius=2)
    perfect = (labels == 1).float()
    assert float(affinity_loss(perfect, labels, seeds)) == 0.0
    assert float(affinity_loss(1 - perfect, labels, seeds)) > 0.5
    with pytest.raises(ValueError):
        affinity_loss(perfect, labels, torch.zeros(1, 3, dtype=torch.long))
