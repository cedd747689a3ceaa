"""Self Correspondence Distillation against NumPy references and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from components.weakly.scd import correspondence, sample_points, scd_loss, second_view


def _np_cos(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """(K, N) x (K, M) -> (N, M) cosine of the columns; a zero column has similarity 0."""
    a = a / np.maximum(np.sqrt((a * a).sum(axis=0, keepdims=True)), eps)
    b = b / np.maximum(np.sqrt((b * b).sum(axis=0, keepdims=True)), eps)
    return a.T @ b


def _np_centred(f: np.ndarray) -> np.ndarray:
    """(N, M): subtract each row's mean over the second view, add back the image's mean."""
    return f - f.mean(axis=1, keepdims=True) + f.mean()


def _np_pick(m: np.ndarray, p: np.ndarray) -> np.ndarray:
    """(K, h, w) map and (P,) flat indices -> (K, P) channel vectors, float64."""
    return m.reshape(m.shape[0], -1).astype(np.float64)[:, p]


def _np_scd(cam1, cam2, seg1, seg2, p1, p2) -> float:
    """NumPy reference in float64: maps (B, K, h, w), points (B, P) flat indices."""
    losses = []
    for b in range(cam1.shape[0]):
        f = _np_centred(_np_cos(_np_pick(cam1[b], p1[b]), _np_pick(cam2[b], p2[b])))
        c = _np_cos(_np_pick(seg1[b], p1[b]), _np_pick(seg2[b], p2[b]))
        losses.append(-(np.maximum(c, 0.0) * f).mean())
    return float(np.mean(losses))  # every image has P1·P2 terms, so the mean of the means


def _maps(vectors, h: int, w: int) -> torch.Tensor:
    """Channel vectors listed in row-major pixel order -> a (1, K, h, w) map."""
    v = torch.tensor(vectors, dtype=torch.float32)  # (h·w, K)
    return v.T.reshape(1, -1, h, w).contiguous()


# Three regions, one-hot CAMs over 3 channels. View 1 (4×4) and view 2 (3×3):
#   A A B B        A B B
#   A A B B        A A B
#   C C C C        C C C
#   C C C C
_ONE_HOT = np.eye(3)
_REGIONS1 = [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2]
_REGIONS2 = [0, 1, 1, 0, 0, 1, 2, 2, 2]
_CAM1 = _maps(_ONE_HOT[_REGIONS1].tolist(), 4, 4)
_CAM2 = _maps(_ONE_HOT[_REGIONS2].tolist(), 3, 3)
_ALL1 = torch.arange(16).unsqueeze(0)


def test_sample_points_shape_range_and_reproducible():
    pts = sample_points(3, 2, 3, 600, generator=torch.Generator().manual_seed(0))
    assert pts.shape == (3, 600) and pts.dtype == torch.int64
    for row in pts:  # every one of the 6 positions is drawn, nothing outside them
        assert sorted(row.unique().tolist()) == list(range(6))
    again = sample_points(3, 2, 3, 600, generator=torch.Generator().manual_seed(0))
    other = sample_points(3, 2, 3, 600, generator=torch.Generator().manual_seed(1))
    assert torch.equal(pts, again)
    assert not torch.equal(pts, other)
    with pytest.raises(ValueError):
        sample_points(1, 0, 3, 5)


def test_sample_points_independent_per_image():
    pts = sample_points(4, 10, 10, 50, generator=torch.Generator().manual_seed(0))
    for i in range(4):
        for j in range(i + 1, 4):
            assert (pts[i] != pts[j]).float().mean() > 0.8  # equal draws: p = 0.01 each
    # Uniform: over many draws every position's frequency is near 1/100.
    many = sample_points(2, 10, 10, 20000, generator=torch.Generator().manual_seed(2))
    freq = torch.bincount(many.flatten(), minlength=100).float() / many.numel()
    assert freq.min() > 0.006 and freq.max() < 0.014


def test_correspondence_matches_numpy_and_zero_vectors_give_zero():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 4, 5, generator=g), torch.randn(2, 4, 3, generator=g)
    a[1, :, 2] = 0.0  # a background pixel with an all-zero CAM
    out = correspondence(a, b)
    assert out.shape == (2, 5, 3)
    for k in range(2):
        np.testing.assert_allclose(out[k].numpy(), _np_cos(a[k].numpy(), b[k].numpy()), atol=1e-6)
    assert torch.isfinite(out).all() and torch.equal(out[1, 2], torch.zeros(3))
    assert (out.abs() <= 1 + 1e-6).all()


def test_hand_computed_value():
    # View 1 is 2×2, view 2 is 1×2; every pixel is a sampled point.
    cam1 = _maps([[1, 0], [0, 1], [1, 1], [3, 0]], 2, 2)
    cam2 = _maps([[1, 0], [0, 2]], 1, 2)
    seg1 = _maps([[1, 0], [1, 1], [0, 1], [-2, 0]], 2, 2)
    seg2 = _maps([[1, 0], [0, 3]], 1, 2)
    p1, p2 = torch.tensor([[0, 1, 2, 3]]), torch.tensor([[0, 1]])
    s = 1 / math.sqrt(2)
    f = np.array([[1, 0], [0, 1], [s, s], [1, 0]])  # cosines of the CAM vectors
    rows = np.array([[0.5], [0.5], [s], [0.5]])  # mean over view 2's points
    g = (3 + math.sqrt(2)) / 8  # mean of all eight
    f_centred = f - rows + g
    c = np.array([[1, 0], [s, s], [0, 1], [-1, 0]])  # cosines of the seg vectors
    expected = -(np.maximum(c, 0) * f_centred).mean()
    # By hand: the relu(C)-weighted rows give 0.5 + g, √2·g, g, 0, so L = −(12 + 5√2) / 64.
    assert expected == pytest.approx(-(12 + 5 * math.sqrt(2)) / 64)
    loss = scd_loss(cam1, cam2, seg1, seg2, points1=p1, points2=p2)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # The order of the points does not matter; duplicating one changes the mean.
    assert scd_loss(cam1, cam2, seg1, seg2, points1=p1.flip(1), points2=p2).item() == (
        pytest.approx(expected, abs=1e-6)
    )
    dup = scd_loss(cam1, cam2, seg1, seg2, points1=torch.tensor([[0, 0, 1, 2, 3]]), points2=p2)
    assert dup.item() != pytest.approx(expected, abs=1e-4)


def test_matches_numpy_reference_on_random_batches():
    g = torch.Generator().manual_seed(3)
    cam1, cam2 = torch.rand(2, 4, 6, 5, generator=g), torch.rand(2, 4, 2, 3, generator=g)
    seg1, seg2 = torch.randn(2, 3, 6, 5, generator=g), torch.randn(2, 3, 2, 3, generator=g)
    p1 = sample_points(2, 6, 5, 17, generator=g)
    p2 = sample_points(2, 2, 3, 11, generator=g)
    loss = scd_loss(cam1, cam2, seg1, seg2, points1=p1, points2=p2)
    ref = _np_scd(cam1.numpy(), cam2.numpy(), seg1.numpy(), seg2.numpy(), p1.numpy(), p2.numpy())
    assert loss.item() == pytest.approx(ref, abs=1e-6)
    # The added-back mean is per image: the batch's loss is the mean of the single-image losses.
    singles = [
        scd_loss(
            cam1[k, None],
            cam2[k, None],
            seg1[k, None],
            seg2[k, None],
            points1=p1[k, None],
            points2=p2[k, None],
        )
        for k in range(2)
    ]
    assert loss.item() == pytest.approx(sum(s.item() for s in singles) / 2, abs=1e-6)


def test_sampled_points_follow_the_generator():
    g = torch.Generator().manual_seed(4)
    cam1, cam2 = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 6, 6, generator=g)
    seg1, seg2 = torch.randn(2, 5, 8, 8, generator=g), torch.randn(2, 5, 6, 6, generator=g)
    a = scd_loss(cam1, cam2, seg1, seg2, num_points=30, generator=torch.Generator().manual_seed(9))
    b = scd_loss(cam1, cam2, seg1, seg2, num_points=30, generator=torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(9)  # view 1's points are drawn first, then view 2's
    p1, p2 = sample_points(2, 8, 8, 30, gen), sample_points(2, 6, 6, 30, gen)
    ref = _np_scd(cam1.numpy(), cam2.numpy(), seg1.numpy(), seg2.numpy(), p1.numpy(), p2.numpy())
    assert a.item() == b.item() == pytest.approx(ref, abs=1e-6)


def test_small_maps_use_every_pixel_once():
    # 30 points requested, view 2 has 9 pixels: all of them, once (no sampling noise).
    g = torch.Generator().manual_seed(4)
    cam1, cam2 = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 3, 3, generator=g)
    seg1, seg2 = torch.randn(2, 5, 8, 8, generator=g), torch.randn(2, 5, 3, 3, generator=g)
    gen = torch.Generator().manual_seed(9)
    a = scd_loss(cam1, cam2, seg1, seg2, num_points=30, generator=gen)
    p1 = sample_points(2, 8, 8, 30, torch.Generator().manual_seed(9))
    p2 = torch.arange(9).expand(2, -1)
    ref = _np_scd(cam1.numpy(), cam2.numpy(), seg1.numpy(), seg2.numpy(), p1.numpy(), p2.numpy())
    assert a.item() == pytest.approx(ref, abs=1e-6)


def test_gradients_reach_the_seg_maps_only():
    g = torch.Generator().manual_seed(5)
    cam1 = torch.rand(2, 3, 5, 5, generator=g).requires_grad_()
    cam2 = torch.rand(2, 3, 2, 2, generator=g).requires_grad_()
    seg1 = torch.randn(2, 4, 5, 5, generator=g).requires_grad_()
    seg2 = torch.randn(2, 4, 2, 2, generator=g).requires_grad_()
    scd_loss(cam1, cam2, seg1, seg2, num_points=40, generator=g).backward()
    assert cam1.grad is None and cam2.grad is None
    assert seg1.grad.abs().sum() > 0 and seg2.grad.abs().sum() > 0


def test_copying_the_cam_correspondences_is_minimal():
    # Why this holds, and only in this form: L = −mean(relu(C)·F̃) with C ≤ 1, so every seg map
    # has L ≥ −mean(relu(F̃)), reached iff C = 1 wherever F̃ > 0 and C ≤ 0 wherever F̃ < 0. With
    # one-hot CAMs F ∈ {0, 1} and a row's mean is the share q of view-2 points in u's region.
    # When every region has the same share (2 of 6 points each, below), all rows have mean 1/3,
    # so does the image, and F̃ = F: seg = CAM gives C = F, which is 1 exactly where F̃ > 0 (the
    # bound), while any seg map whose same-region similarities drop below 1 is strictly worse.
    # (Unequal shares make F̃ > 0 on some cross-region pairs and the bound unreachable by C = F;
    # see the next test.)
    p2 = torch.tensor([[0, 3, 1, 2, 6, 7]])  # regions A, A, B, B, C, C
    f = _np_cos(_CAM1.flatten(2)[0].numpy(), _CAM2.flatten(2)[0, :, p2[0]].numpy())
    np.testing.assert_allclose(_np_centred(f), f)  # equal shares: the centring is the identity
    bound = -np.maximum(f, 0).mean()

    def loss(s1, s2):
        return scd_loss(_CAM1, _CAM2, s1, s2, points1=_ALL1, points2=p2).item()

    match = loss(_CAM1.clone(), _CAM2.clone())
    assert match == pytest.approx(bound, abs=1e-6)
    g = torch.Generator().manual_seed(6)
    candidates = {
        f"noisy{k}": (
            _CAM1 + 0.3 * torch.randn(_CAM1.shape, generator=g),
            _CAM2 + 0.3 * torch.randn(_CAM2.shape, generator=g),
        )
        for k in range(3)
    }
    for k in range(3):
        candidates[f"random{k}"] = (
            torch.randn(1, 4, 4, 4, generator=g),
            torch.randn(1, 4, 3, 3, generator=g),
        )
    split = _CAM1.clone()
    split[0, :, 0, :2] = torch.tensor([1.0, 1.0, 0.0]).unsqueeze(1)  # half of A looks like A+B
    candidates["split"] = (split, _CAM2.clone())
    for name, (s1, s2) in candidates.items():
        assert loss(s1, s2) > match + 1e-3, name
    # A collapsed head (one vector everywhere, C = 1) ties: here F̃ = F is 0, not negative, on
    # cross-region pairs, so nothing there is penalised. Copying is *a* minimiser, not the only one.
    assert loss(torch.ones(1, 3, 4, 4), torch.ones(1, 3, 3, 3)) == pytest.approx(match, abs=1e-6)


def test_one_hot_cams_copy_versus_collapse_closed_form():
    # Unequal shares in view 2: A 3/5, B 1/5, C 1/5; view 1 (all 16 pixels) is A 1/4, B 1/4,
    # C 1/2. Row means r = share of u's region, image mean g = mean_u r = 0.3. With F ∈ {0, 1}:
    #   copy  (C = F): L = −mean F·(F − r + g) = −g + mean r² − g² = −g + Var r = −0.27
    #   collapse (C = 1): L = −mean F̃ = −g = −0.30.
    # So the formula (paper-faithful centring) prefers a collapsed head here; the loss is a shaping
    # term beside the segmentation loss, not a stand-alone objective. Both stay ≥ the bound.
    p2 = torch.tensor([[0, 3, 4, 1, 6]])
    copy = scd_loss(_CAM1, _CAM2, _CAM1.clone(), _CAM2.clone(), points1=_ALL1, points2=p2)
    collapse = scd_loss(
        _CAM1, _CAM2, torch.ones(1, 2, 4, 4), torch.ones(1, 2, 3, 3), points1=_ALL1, points2=p2
    )
    assert copy.item() == pytest.approx(-0.27, abs=1e-6)
    assert collapse.item() == pytest.approx(-0.30, abs=1e-6)
    f_c = _np_centred(_np_cos(_CAM1.flatten(2)[0].numpy(), _CAM2.flatten(2)[0, :, p2[0]].numpy()))
    assert f_c.min() < 0 < f_c.max()
    bound = -np.maximum(f_c, 0).mean()
    assert bound < collapse.item() < copy.item()


def test_zero_cam_vectors_give_finite_loss_and_gradients():
    g = torch.Generator().manual_seed(7)
    cam1, cam2 = torch.rand(2, 3, 4, 4, generator=g), torch.rand(2, 3, 2, 2, generator=g)
    cam1[:, :, :2] = 0.0  # background rows with all-zero CAMs
    cam2[1] = 0.0  # a whole view without activation
    seg1 = torch.randn(2, 3, 4, 4, generator=g).requires_grad_()
    seg2 = torch.randn(2, 3, 2, 2, generator=g)
    seg2[0, :, 0, 0] = 0.0  # and a zero logit vector
    seg2.requires_grad_()
    p1, p2 = sample_points(2, 4, 4, 12, g), torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    loss = scd_loss(cam1, cam2, seg1, seg2, points1=p1, points2=p2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(seg1.grad).all()
    assert torch.isfinite(seg2.grad).all()
    ref = _np_scd(
        cam1.numpy(), cam2.numpy(), seg1.detach().numpy(), seg2.detach().numpy(), p1, p2.numpy()
    )
    assert loss.item() == pytest.approx(ref, abs=1e-6)


def test_bf16_inputs_are_computed_in_float32():
    g = torch.Generator().manual_seed(8)
    maps = [
        torch.rand(1, 3, 4, 4, generator=g),
        torch.rand(1, 3, 2, 2, generator=g),
        torch.randn(1, 2, 4, 4, generator=g),
        torch.randn(1, 2, 2, 2, generator=g),
    ]
    bf = [m.bfloat16() for m in maps]
    p1, p2 = torch.tensor([[0, 5, 10, 15]]), torch.tensor([[0, 3]])
    loss = scd_loss(*bf, points1=p1, points2=p2)
    assert loss.dtype == torch.float32
    ref = _np_scd(*[m.float().numpy() for m in bf], p1.numpy(), p2.numpy())
    assert loss.item() == pytest.approx(ref, abs=1e-6)


def test_mismatched_cam_and_seg_sizes_raise():
    cam1, seg1 = torch.rand(1, 2, 4, 4), torch.rand(1, 3, 4, 5)
    cam2, seg2 = torch.rand(1, 2, 2, 2), torch.rand(1, 3, 2, 2)
    with pytest.raises(ValueError, match=r"view 1.*\(1, 2, 4, 4\).*\(1, 3, 4, 5\)"):
        scd_loss(cam1, cam2, seg1, seg2)
    with pytest.raises(ValueError, match=r"view 2.*\(1, 2, 2, 2\).*\(1, 3, 3, 2\)"):
        scd_loss(cam1, cam2, torch.rand(1, 3, 4, 4), torch.rand(1, 3, 3, 2))
    with pytest.raises(ValueError, match="points1"):
        scd_loss(cam1, cam2, torch.rand(1, 3, 4, 4), seg2, points1=torch.tensor([0, 1]))


@pytest.mark.parametrize(
    ("hw", "expected"),
    [((320, 480), (96, 144)), ((7, 5), (2, 2)), ((2, 2), (1, 1)), ((1, 1), (1, 1))],
)
def test_second_view_size(hw, expected):
    images = torch.rand(2, 3, *hw)
    out = second_view(images)
    assert out.shape == (2, 3, *expected) and out.dtype == images.dtype
    assert second_view(torch.rand(1, 3, 10, 20), factor=0.5).shape == (1, 3, 5, 10)
    # A constant image stays constant under bilinear downscaling.
    assert torch.allclose(second_view(torch.full((1, 3, *hw), 0.7)), torch.tensor(0.7))
