"""VARM / plain refinement: hand-computed weights, edge preservation, smoothing, weight sums."""

from __future__ import annotations

import numpy as np
import torch

from components.weakly.varm import (
    appearance_affinity,
    neighbour_offsets,
    neighbour_weights,
    refine,
    variation_term,
)

DIRS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def _softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max())
    return e / e.sum()


def reference_weights(img: np.ndarray, dilations, variation_weight: float) -> np.ndarray:
    """Pixel-by-pixel numpy weights for one (3, H, W) image -> (N, H, W)."""
    _, h, w = img.shape
    offs = [(dy * d, dx * d) for d in dilations for dy, dx in DIRS]
    diff = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            below = img[:, min(y + 1, h - 1), x]
            right = img[:, y, min(x + 1, w - 1)]
            diff[y, x] = np.mean((below - img[:, y, x]) ** 2 + (right - img[:, y, x]) ** 2)
    out = np.zeros((len(offs), h, w))
    for y in range(h):
        for x in range(w):
            pos = [(min(max(y + dy, 0), h - 1), min(max(x + dx, 0), w - 1)) for dy, dx in offs]
            nb = np.stack([img[:, py, px] for py, px in pos])  # (N, 3)
            sigma = nb.std(axis=0, ddof=1) + 1e-8
            kappa = -np.mean((4 * np.abs(nb - img[:, y, x]) / sigma) ** 2, axis=1)
            var = np.array([diff[py, px] for py, px in pos])
            out[:, y, x] = _softmax(kappa) - variation_weight * _softmax(var)
    return out


def reference_refine(img, probs, iterations, dilations, variation_weight) -> np.ndarray:
    a = reference_weights(img, dilations, variation_weight)
    offs = [(dy * d, dx * d) for d in dilations for dy, dx in DIRS]
    _, h, w = probs.shape
    p = probs.copy()
    for _ in range(iterations):
        new = np.zeros_like(p)
        for y in range(h):
            for x in range(w):
                for n, (dy, dx) in enumerate(offs):
                    py, px = min(max(y + dy, 0), h - 1), min(max(x + dx, 0), w - 1)
                    new[:, y, x] += a[n, y, x] * p[:, py, px]
        p = new
    return p


def test_kappa_of_one_pixel_by_hand():
    # 3-channel 3×4 image, dilation 1, the pixel (0, 3): a corner, so five neighbours clamp.
    img = np.array(
        [
            [[0.1, 0.5, 0.9, 0.3], [0.2, 0.7, 0.4, 0.8], [0.6, 0.0, 1.0, 0.5]],
            [[0.9, 0.1, 0.2, 0.6], [0.3, 0.3, 0.8, 0.1], [0.5, 0.4, 0.7, 0.2]],
            [[0.0, 0.2, 0.6, 1.0], [0.4, 0.9, 0.1, 0.3], [0.8, 0.6, 0.3, 0.7]],
        ]
    )
    # Neighbours of (0, 3) in AFA order (dy, dx) with clamping: rows -1 -> 0, columns 4 -> 3.
    pos = [(0, 2), (0, 3), (0, 3), (0, 2), (0, 3), (1, 2), (1, 3), (1, 3)]
    nb = np.stack([img[:, y, x] for y, x in pos])
    centre = img[:, 0, 3]
    sigma = np.sqrt(((nb - nb.mean(0)) ** 2).sum(0) / 7) + 1e-8
    expected = [np.mean((4 * np.abs(nb[n] - centre) / sigma) ** 2) * -1 for n in range(8)]
    kappa = appearance_affinity(torch.tensor(img)[None], dilations=(1,))
    assert kappa.shape == (1, 8, 3, 4)
    np.testing.assert_allclose(kappa[0, :, 0, 3].numpy(), expected, rtol=1e-5)
    # The same-colour neighbours (clamped onto the pixel itself) have κ = 0.
    assert kappa[0, 1, 0, 3] == 0 and kappa[0, 2, 0, 3] == 0 and kappa[0, 4, 0, 3] == 0


def test_variation_term_reads_the_difference_map_at_the_neighbour():
    img = torch.zeros(1, 3, 4, 4)
    img[:, :, :, 2:] = 1.0  # a vertical edge between columns 1 and 2
    v = variation_term(img, dilations=(1,))
    # D is 1 on column 1 (the step to the right), 0 elsewhere. Pixel (2, 2): its left
    # neighbours (directions 0, 3, 5) sit on column 1.
    assert v[0, :, 2, 2].tolist() == [1, 0, 0, 1, 0, 1, 0, 0]


def test_weights_match_a_pixelwise_numpy_reference():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 5, 6, generator=g, dtype=torch.float64)
    for vw in (0.0, 0.01):
        got = neighbour_weights(img, dilations=(1, 2), variation_weight=vw)
        expected = reference_weights(img[0].numpy(), (1, 2), vw)
        np.testing.assert_allclose(got[0].numpy(), expected, rtol=1e-5, atol=1e-7)


def test_refine_matches_a_loop_reference():
    g = torch.Generator().manual_seed(1)
    img = torch.rand(1, 3, 5, 6, generator=g, dtype=torch.float64)
    probs = torch.rand(1, 3, 5, 6, generator=g, dtype=torch.float64)
    got = refine(img, probs, iterations=3, dilations=(1, 2), variation_weight=0.01)
    expected = reference_refine(img[0].numpy(), probs[0].numpy(), 3, (1, 2), 0.01)
    np.testing.assert_allclose(got[0].numpy(), expected, rtol=1e-5, atol=1e-7)


def test_weight_sums_plain_and_varm():
    g = torch.Generator().manual_seed(2)
    img = torch.rand(2, 3, 16, 16, generator=g)
    plain = neighbour_weights(img, variation_weight=0.0)
    varm = neighbour_weights(img)  # default dilations: 48 neighbours, variation_weight 0.01
    assert plain.shape == varm.shape == (2, 48, 16, 16)
    assert len(neighbour_offsets()) == 48
    np.testing.assert_allclose(plain.sum(1).numpy(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(varm.sum(1).numpy(), 0.99, rtol=1e-5)


def test_constant_scores_stay_constant_and_shrink_by_the_weight_sum():
    g = torch.Generator().manual_seed(3)
    img = torch.rand(1, 3, 20, 20, generator=g)
    probs = torch.tensor([0.1, 0.7, 0.2]).view(1, 3, 1, 1).expand(1, 3, 20, 20).contiguous()
    out = refine(img, probs, iterations=10)
    assert (out.argmax(1) == 1).all()
    np.testing.assert_allclose(out.numpy(), (probs * 0.99**10).numpy(), rtol=1e-5)
    plain = refine(img, probs, iterations=10, variation_weight=0.0)
    np.testing.assert_allclose(plain.numpy(), probs.numpy(), rtol=1e-5)


def _edge_scene(size: int = 32):
    img = torch.zeros(1, 3, size, size)
    img[..., size // 2 :] = 1.0  # left half black, right half white
    probs = torch.zeros(1, 3, size, size)
    probs[0, 1, :, : size // 2] = 0.8  # class 1 on the left
    probs[0, 2, :, size // 2 :] = 0.8  # class 2 on the right
    # A strong class-1 seed in the last left column, right at the edge, and a weak one in the
    # first right column (wrong side: the image says it belongs with the right half).
    probs[0, 1, :, size // 2 - 1] = 1.0
    probs[0, 1, :, size // 2] = 0.79
    return img, probs


def test_labels_do_not_leak_across_a_strong_edge():
    img, probs = _edge_scene()
    half = img.shape[-1] // 2
    assert (probs[0, 1, :, half] > probs[0, 2, :, half] - 0.05).all()  # a near tie before
    for vw in (0.01, 0.0):
        label = refine(img, probs, iterations=10, variation_weight=vw).argmax(1)[0]
        assert (label[:, half:] == 2).all(), vw
        assert (label[:, :half] == 1).all(), vw


def test_smooths_salt_and_pepper_inside_a_uniform_region():
    g = torch.Generator().manual_seed(4)
    img = torch.full((1, 3, 24, 24), 0.4)
    probs = torch.zeros(1, 3, 24, 24)
    probs[0, 1] = 0.6
    noise = torch.rand(24, 24, generator=g) < 0.08
    probs[0, 1][noise] = 0.2
    probs[0, 2][noise] = 0.9
    assert (probs.argmax(1) == 2).sum() == noise.sum() > 10  # the noise wins its pixels before
    out = refine(img, probs, iterations=10)
    assert (out.argmax(1) == 1).all()


def test_refines_a_batch_at_the_default_dilations():
    # (2, 3, 64, 64) with K = 4 and all 48 neighbours (about 0.05 s on one CPU thread).
    img = torch.rand(2, 3, 64, 64)
    probs = torch.rand(2, 4, 64, 64)
    out = refine(img, probs)
    assert out.shape == (2, 4, 64, 64) and torch.isfinite(out).all()
