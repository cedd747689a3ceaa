import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from components.distillation.texture import (
    anchor_similarity,
    equalized_histogram,
    quantization_levels,
    soft_assignment,
    statistical_texture_loss,
    statistical_texture_terms,
    texture_descriptor,
)

_K = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16


def _np_band1(x: np.ndarray) -> np.ndarray:
    """Level-1 Laplacian band-pass of an (H,W) map with scipy's mirror (= torch reflect) blur."""

    def blur(a):
        return ndimage.correlate1d(
            ndimage.correlate1d(a, _K, axis=1, mode="mirror"), _K, 0, mode="mirror"
        )

    up = np.zeros_like(x)
    up[::2, ::2] = 4 * blur(x)[::2, ::2]
    return x - blur(up)


def _np_anchor_similarity(feat: np.ndarray, grids) -> np.ndarray:
    """(C,H,W) -> (G,H*W), with adaptive-pool regions [⌊iH/g⌋, ⌈(i+1)H/g⌉) and pixel (y,x) in
    cell (⌊yg/H⌋, ⌊xg/W⌋)."""
    c, h, w = feat.shape
    energy = np.mean([np.abs(_np_band1(feat[j])) for j in range(c)], axis=0)
    weight = energy + 1e-3 * energy.mean() + 1e-12
    out = []
    for g in grids:
        sim = np.zeros((h, w))
        for y in range(h):
            for x in range(w):
                cy, cx = y * g // h, x * g // w
                ys = slice(cy * h // g, math.ceil((cy + 1) * h / g))
                xs = slice(cx * w // g, math.ceil((cx + 1) * w / g))
                wc = weight[ys, xs]
                anchor = (feat[:, ys, xs] * wc).sum(axis=(1, 2)) / wc.sum()
                f = feat[:, y, x]
                sim[y, x] = f @ anchor / (np.linalg.norm(f) * np.linalg.norm(anchor))
        out.append(sim.ravel())
    return np.stack(out)


def _np_lloyd(s: np.ndarray, n: int, rounds: int) -> np.ndarray:
    levels = np.linspace(s.min(), s.max(), n)
    for _ in range(rounds):
        nearest = np.argmin(np.abs(s[:, None] - levels[None, :]), axis=1)  # ties: lower level
        new = levels.copy()
        for q in range(n):
            if np.any(nearest == q):
                new[q] = s[nearest == q].mean()
        levels = new
    return levels


def _np_clahe(h: np.ndarray, limit: float, rounds: int = 500) -> np.ndarray:
    """Repeat clip-and-redistribute-to-bins-below-the-limit until nothing is left over."""
    h = h.copy()
    for _ in range(rounds):
        excess = np.clip(h - limit, 0, None).sum()
        h = np.minimum(h, limit)
        below = h < limit - 1e-15
        if excess < 1e-15 or not below.any():
            break
        h[below] += excess / below.sum()
    return h


def _hist_of(h: list[float]) -> torch.Tensor:
    """Assignments (1, 1, N) whose histogram is h."""
    return torch.tensor(h, dtype=torch.float64).view(1, 1, -1)


@pytest.mark.parametrize(
    "size, grids", [((6, 6), (1, 2)), ((5, 7), (1, 2)), ((12, 12), (1, 2, 3, 6)), ((7, 10), (3, 6))]
)
def test_anchor_similarity_matches_numpy_reference(size, grids):
    # (12, 12) with the default grids is the default config's low map; (7, 10) has overlapping
    # cells (g does not divide the size) and pixels whose cell is not the first that holds them.
    feat = torch.randn(2, 3, *size, dtype=torch.float64)
    got = anchor_similarity(feat, grids=grids)
    assert tuple(got.shape) == (2, len(grids), size[0] * size[1])
    for i in range(2):
        np.testing.assert_allclose(
            got[i].numpy(), _np_anchor_similarity(feat[i].numpy(), grids), atol=1e-10
        )


def test_anchor_similarity_of_a_zero_feature_vector_is_zero_with_finite_gradients():
    feat = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    feat[0, :, 2, 3] = 0
    feat.requires_grad_()
    s = anchor_similarity(feat)
    assert (s[0, :, 2 * 6 + 3] == 0).all()
    s.sum().backward()
    assert torch.isfinite(feat.grad).all() and feat.grad.abs().sum() > 0


def test_anchor_similarity_is_one_for_a_spatially_constant_feature():
    feat = torch.randn(1, 4, 1, 1).expand(1, 4, 8, 8).contiguous()
    torch.testing.assert_close(anchor_similarity(feat), torch.ones(1, 4, 64))


def test_levels_sorted_inside_range_and_uniform_without_rounds():
    s = torch.rand(2, 3, 50) * 2 - 1
    levels = quantization_levels(s, 8, 3)
    assert tuple(levels.shape) == (2, 3, 8)
    assert (levels.diff(dim=-1) > 0).all()
    assert (levels >= s.amin(-1, keepdim=True)).all() and (levels <= s.amax(-1, keepdim=True)).all()
    uniform = quantization_levels(s, 5, 0)
    lo, hi = s.amin(-1, keepdim=True), s.amax(-1, keepdim=True)
    torch.testing.assert_close(uniform, lo + (hi - lo) * torch.linspace(0, 1, 5))


def test_lloyd_max_matches_numpy_reference():
    rng = np.random.default_rng(0)
    rows = np.stack(
        [np.concatenate([rng.normal(0, 1, 25), rng.normal(4, 0.5, 15)]), rng.uniform(-1, 1, 40)]
    )
    got = quantization_levels(torch.from_numpy(rows), 5, 4).numpy()
    for row, levels in zip(rows, got):
        np.testing.assert_allclose(levels, _np_lloyd(row, 5, 4), atol=1e-12)
        assert not np.allclose(levels, np.linspace(row.min(), row.max(), 5))  # rounds moved them


def test_empty_levels_are_reseeded_without_duplicates_or_nans():
    g = torch.Generator().manual_seed(0)
    s = torch.cat(
        [0.1 + 0.01 * torch.randn(30, generator=g), 0.9 + 0.01 * torch.randn(30, generator=g)]
    )
    levels = quantization_levels(s, 8, 3)
    assert torch.isfinite(levels).all() and (levels.diff() > 1e-3).all()
    assert levels[0].item() == pytest.approx(s[:30].mean().item(), abs=1e-6)
    assert levels[-1].item() == pytest.approx(s[30:].mean().item(), abs=1e-6)


def test_fewer_than_two_levels_raise():
    with pytest.raises(ValueError, match="method.dtiem.levels"):
        quantization_levels(torch.rand(10), 1, 3)
    with pytest.raises(ValueError, match="method.dtiem.levels"):
        statistical_texture_loss(torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8), num_levels=1)


def test_soft_assignment_hat_weights_and_gradient():
    s = torch.rand(30, dtype=torch.float64)
    levels = torch.linspace(0, 1, 5, dtype=torch.float64)
    e = soft_assignment(s, levels)
    ref = np.maximum(0, 1 - np.abs(s.numpy()[:, None] - levels.numpy()[None]) / 0.25)
    np.testing.assert_allclose(e.numpy(), ref, atol=1e-12)
    torch.testing.assert_close(e.sum(-1), torch.ones(30, dtype=torch.float64))
    # Non-uniform levels: the hat's width is the gap on the value's side.
    x = torch.tensor([0.3, 0.05, -0.05], dtype=torch.float64, requires_grad=True)
    e = soft_assignment(x, torch.tensor([0.0, 0.1, 0.5, 1.0], dtype=torch.float64))
    expected = [[0, 0.5, 0.5, 0], [0.5, 0.5, 0, 0], [0.5, 0, 0, 0]]
    torch.testing.assert_close(e, torch.tensor(expected, dtype=torch.float64))
    (e * torch.arange(4.0, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([2.5, 10.0, 0.0], dtype=torch.float64))


def test_histogram_clip_and_denoise_hand_values():
    limit_two = equalized_histogram(_hist_of([0.7, 0.1, 0.1, 0.1]), clip=2.0)
    torch.testing.assert_close(limit_two, _hist_of([0.5, 0.5 / 3, 0.5 / 3, 0.5 / 3])[0])
    # Survivors (3 bins at 0.3) cannot hold the mass: the dropped bin receives it too.
    crowded = equalized_histogram(_hist_of([0.45, 0.45, 0.1, 0.0]), clip=1.2)
    torch.testing.assert_close(crowded, _hist_of([0.3, 0.3, 0.25, 0.15])[0])
    # A noise bin (< eps) is dropped and stays empty; the excess goes to the other two.
    h = np.array([0.6, 0.2, 0.1995, 0.0005])
    kept = h[:3] / h[:3].sum()
    excess = kept[0] - 0.5
    expected = [0.5, kept[1] + excess / 2, kept[2] + excess / 2, 0.0]
    got = equalized_histogram(_hist_of(h.tolist()), clip=2.0)
    np.testing.assert_allclose(got[0].numpy(), expected, atol=1e-12)
    flat = _hist_of([0.25, 0.25, 0.3, 0.2])
    torch.testing.assert_close(equalized_histogram(flat, clip=2.0), flat[0])
    with pytest.raises(ValueError, match="clip"):
        equalized_histogram(flat, clip=0.5)


def test_histogram_clip_limit_holds_and_matches_iterated_clahe():
    g = torch.Generator().manual_seed(1)
    n, beta = 16, 2.0
    peaked = torch.rand(2, 3, 50, n, generator=g, dtype=torch.float64) * torch.exp(
        -torch.arange(n) / 2.0
    )
    h = equalized_histogram(peaked, clip=beta, eps=0.0)
    torch.testing.assert_close(h.sum(-1), torch.ones(2, 3, dtype=torch.float64))
    assert (h <= beta / n + 1e-12).all()
    assert (h > beta / n - 1e-12).any()  # the clip was active
    raw = (peaked.sum(-2) / peaked.sum((-2, -1))[..., None]).numpy()
    for row, got in zip(raw.reshape(-1, n), h.reshape(-1, n).numpy()):
        np.testing.assert_allclose(got, _np_clahe(row, beta / n), atol=1e-9)


def test_descriptor_shapes_given_levels_and_level_mean():
    feat = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    desc = texture_descriptor(feat, num_levels=8)
    assert tuple(desc["levels"].shape) == tuple(desc["hist"].shape) == (2, 4, 8)
    assert tuple(desc["level_mean"].shape) == (2, 4, 8, 4)
    torch.testing.assert_close(desc["hist"].sum(-1), torch.ones(2, 4, dtype=torch.float64))
    other = texture_descriptor(torch.randn(2, 4, 16, 16, dtype=torch.float64), desc["levels"])
    assert torch.equal(other["levels"], desc["levels"])
    # level_mean for grid 1 of sample 0, from the soft assignment written out.
    e = soft_assignment(anchor_similarity(feat, (1,))[0, 0], desc["levels"][0, 0]).numpy()
    f = feat[0].flatten(1).numpy()  # (C, HW)
    ref = np.stack([(f * e[:, q]).sum(1) / max(e[:, q].sum(), 1e-6) for q in range(8)])
    np.testing.assert_allclose(desc["level_mean"][0, 0].numpy(), ref, atol=1e-10)


def test_statistical_loss_zero_when_equal_positive_otherwise_with_gradient():
    teacher = torch.randn(2, 4, 16, 16, requires_grad=True)
    student = torch.randn(2, 4, 16, 16, requires_grad=True)
    assert statistical_texture_loss(teacher.detach(), teacher.detach().clone()).item() == 0.0
    loss = statistical_texture_loss(student, teacher)
    assert loss.dim() == 0 and loss.item() > 0
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_statistical_loss_resizes_student_and_checks_channels():
    teacher = torch.randn(1, 3, 12, 12)
    student = torch.randn(1, 3, 6, 6)
    resized = F.interpolate(student, size=(12, 12), mode="bilinear", align_corners=False)
    expected = statistical_texture_loss(resized, teacher, num_levels=8).item()
    assert statistical_texture_loss(student, teacher, num_levels=8).item() == pytest.approx(
        expected, rel=1e-6
    )
    with pytest.raises(ValueError, match=r"\(1, 2, 12, 12\).*\(1, 3, 12, 12\)"):
        statistical_texture_loss(torch.randn(1, 2, 12, 12), teacher)


def _pixels(*vectors) -> torch.Tensor:
    """A (1, C, 1, W) map whose W pixels are the given C-vectors (under 3 px per side: uniform
    importance, so anchors are plain means)."""
    return torch.tensor(vectors, dtype=torch.float32).T.reshape(1, len(vectors[0]), 1, -1)


def test_statistical_loss_hand_values_on_a_tiny_input():
    # Grid 1 only, N = 2 levels. Teacher pixels a=(1,0), b=(0,1), c=d=(1,1): anchor ∝ (1,1), so
    # s = [1/√2, 1/√2, 1, 1], levels [1/√2, 1], hist [1/2, 1/2], level means (1/2,1/2), (1,1).
    # Student pixels (1,0),(0,1),(1,0),(0,1): anchor ∝ (1,1), s = 1/√2 everywhere, all mass on
    # level 0: hist [1, 0], level means (1/2,1/2) and (0,0) (an empty level).
    # hist term: N² · mean((1/2)², (1/2)²) = 4 · 1/4 = 1.
    # level-mean term: mean over 4 elements of (0,0,1,1)² = 1/2, over the teacher's mean square
    # (1+0+0+1+1+1+1+1)/8 = 3/4: 2/3.
    teacher = _pixels((1, 0), (0, 1), (1, 1), (1, 1))
    student = _pixels((1, 0), (0, 1), (1, 0), (0, 1))
    terms = statistical_texture_terms(student, teacher, num_levels=2, iterations=0, grids=(1,))
    assert terms["hist"].item() == pytest.approx(1.0, rel=1e-5)
    assert terms["level_mean"].item() == pytest.approx(2 / 3, rel=1e-5)
    loss = statistical_texture_loss(student, teacher, num_levels=2, iterations=0, grids=(1,))
    assert loss.item() == pytest.approx(5 / 3, rel=1e-5)
    # Same histograms, level means swapped by a per-pixel scale: teacher a=(1,0), b=(1,1) has s
    # [2/√5, 3/√10]; student a=(2,0), b=(1,1) has the same two values the other way round, so
    # its level means are (1,1), (2,0) against (1,0), (1,1): 3/4 over the mean square 3/4.
    teacher, student = _pixels((1, 0), (1, 1)), _pixels((2, 0), (1, 1))
    terms = statistical_texture_terms(student, teacher, num_levels=2, iterations=0, grids=(1,))
    assert terms["hist"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["level_mean"].item() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_statistical_terms_and_their_ratio_do_not_depend_on_the_feature_scale(scale):
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 8, 12, 12, generator=g).relu()
    student = torch.randn(2, 8, 12, 12, generator=g).relu()
    base = statistical_texture_terms(student, teacher)
    scaled = statistical_texture_terms(student * scale, teacher * scale)
    for key in ("hist", "level_mean"):
        assert scaled[key].item() == pytest.approx(base[key].item(), rel=1e-4)
    ratio = base["hist"] / base["level_mean"]
    assert (scaled["hist"] / scaled["level_mean"]).item() == pytest.approx(ratio.item(), rel=1e-4)


def test_histogram_term_carries_a_real_share_of_the_loss():
    # Unscaled (MSE of hist + MSE of level means) the histogram was 0.05% of L_sta on these maps
    # and 0.15% on the synthetic benchmark's features (docs/methods.md); on the unit scale of
    # `statistical_texture_terms` it is a sizeable part.
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(8, 32, 12, 12, generator=g)
    student = teacher + torch.randn(teacher.shape, generator=g)
    terms = statistical_texture_terms(student, teacher)
    share = (terms["hist"] / (terms["hist"] + terms["level_mean"])).item()
    assert 0.05 < share < 0.95
    unscaled_hist = terms["hist"].item() / 16**2
    unscaled_mean = terms["level_mean"].item() * teacher.square().mean().item()
    assert unscaled_hist / (unscaled_hist + unscaled_mean) < 0.002


def test_statistical_loss_of_an_all_zero_teacher_is_finite():
    student = torch.randn(1, 3, 8, 8, requires_grad=True)
    loss = statistical_texture_loss(student, torch.zeros(1, 3, 8, 8))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
