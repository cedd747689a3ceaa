import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage import data

from components.distillation import contourlet as contourlet_module
from components.distillation.contourlet import (
    binomial_blur,
    contourlet,
    directional_subbands,
    laplacian_band,
    laplacian_pyramid,
    max_levels,
    reconstruct_laplacian,
    structural_texture_loss,
)

_K = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16


def _np_blur(x: np.ndarray) -> np.ndarray:
    # scipy's "mirror" (d c b | a b c d | c b a) is torch's "reflect".
    return ndimage.correlate1d(
        ndimage.correlate1d(x, _K, axis=1, mode="mirror"), _K, 0, mode="mirror"
    )


def _np_pyramid(x: np.ndarray, levels: int) -> tuple[list[np.ndarray], np.ndarray]:
    bands = []
    for _ in range(levels):
        low = _np_blur(x)[::2, ::2]
        up = np.zeros_like(x)
        up[::2, ::2] = 4 * low
        bands.append(x - _np_blur(up))
        x = low
    return bands, x


def _np_subbands(band: np.ndarray, d: int) -> np.ndarray:
    """(H,W) -> (D,H,W): raised-cosine wedges in the doubled-angle form, DC shared equally."""
    if d == 1:
        return band[None]
    h, w = band.shape
    phi = np.arctan2(np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :])
    spec = np.fft.fft2(band)
    out = []
    for k in range(d):
        delta = np.angle(np.exp(2j * (phi - k * np.pi / d))) / 2  # distance modulo pi
        mask = np.where(np.abs(delta) < np.pi / d, 0.5 * (1 + np.cos(d * delta)), 0.0)
        mask[0, 0] = 1 / d
        out.append(np.fft.ifft2(spec * mask).real)
    return np.stack(out)


def _np_standardize(x: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=(-2, -1), keepdims=True)
    var = x.var(axis=(-2, -1), keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


def _np_structural(s: np.ndarray, t: np.ndarray, levels: int, d: int) -> float:
    """L_str for (B,C,H,W) arrays, one (sample, channel) map at a time. The eps of a sample is
    1e-6 x the mean sub-band variance over (channel, level, direction), the larger of the two."""
    b, c = s.shape[:2]
    subbands = {}  # (which, sample, channel, level) -> (D, H_n, W_n)
    for name, x in (("s", s), ("t", t)):
        for i in range(b):
            for j in range(c):
                for n, band in enumerate(_np_pyramid(x[i, j], levels)[0]):
                    subbands[name, i, j, n] = _np_subbands(band, d)
    eps = [
        1e-6
        * max(
            np.mean(
                [subbands[name, i, j, n].var(axis=(1, 2)) for j in range(c) for n in range(levels)]
            )
            for name in ("s", "t")
        )
        for i in range(b)
    ]
    total = 0.0
    for n in range(levels):
        per_direction = np.zeros(d)
        for i in range(b):
            for j in range(c):
                zs = _np_standardize(subbands["s", i, j, n], eps[i])
                zt = _np_standardize(subbands["t", i, j, n], eps[i])
                per_direction += ((zs - zt) ** 2).mean(axis=(1, 2))
        total += (per_direction / (b * c)).sum()
    return total


@pytest.fixture(params=["dense", "fft"])
def moments_path(request, monkeypatch):
    """L_str's two ways to the sub-band moments: the precomputed matrix (maps up to
    _DENSE_MAX_PIXELS) and the per-level FFT (larger maps); every loss test runs both."""
    if request.param == "fft":
        monkeypatch.setattr(contourlet_module, "_DENSE_MAX_PIXELS", 0)
    else:
        monkeypatch.setattr(contourlet_module, "_DENSE_MAX_PIXELS", 10**6)
    return request.param


def test_blur_matches_scipy_reflect():
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    got = binomial_blur(x).numpy()
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(got[i, j], _np_blur(x[i, j].numpy()), atol=1e-12)


def test_pyramid_matches_numpy_reference_with_odd_sizes():
    x = torch.randn(1, 2, 13, 10, dtype=torch.float64)
    bands, low = laplacian_pyramid(x, 2)
    assert [tuple(b.shape) for b in bands] == [(1, 2, 13, 10), (1, 2, 7, 5)]
    assert tuple(low.shape) == (1, 2, 4, 3)
    for j in range(2):
        ref_bands, ref_low = _np_pyramid(x[0, j].numpy(), 2)
        for got, ref in zip(bands, ref_bands):
            np.testing.assert_allclose(got[0, j].numpy(), ref, atol=1e-12)
        np.testing.assert_allclose(low[0, j].numpy(), ref_low, atol=1e-12)


@pytest.mark.parametrize("size", [(16, 16), (13, 10), (9, 7), (3, 5)])
def test_pyramid_reconstructs_random_tensors(size):
    x = torch.randn(2, 3, *size)
    levels = max_levels(*size)
    bands, low = laplacian_pyramid(x, levels)
    assert len(bands) == levels
    torch.testing.assert_close(reconstruct_laplacian(bands, low), x, atol=1e-5, rtol=0)


def test_pyramid_reconstructs_a_photo():
    img = torch.from_numpy(data.astronaut()[::2, ::2].astype(np.float32) / 255).permute(2, 0, 1)
    x = img[None].contiguous()  # (1,3,256,256)
    bands, low = laplacian_pyramid(x, 3)
    assert tuple(low.shape) == (1, 3, 32, 32)
    assert bands[0].abs().mean() > 1e-3  # a real photo has band-pass content
    torch.testing.assert_close(reconstruct_laplacian(bands, low), x, atol=1e-5, rtol=0)


def test_too_deep_or_zero_levels_raise_naming_the_limit():
    assert max_levels(12, 12) == 3  # inputs 12, 6, 3 px; a 4th level would blur a 2 px map
    assert max_levels(40, 5) == 2 and max_levels(2, 100) == 0
    laplacian_pyramid(torch.zeros(1, 1, 12, 12), 3)
    with pytest.raises(ValueError, match=r"levels=4 is too deep for a 12x12 .*at most 3 levels"):
        laplacian_pyramid(torch.zeros(1, 1, 12, 12), 4)
    with pytest.raises(ValueError, match="at most 2 levels"):
        contourlet(torch.zeros(1, 1, 40, 5), levels=3)
    with pytest.raises(ValueError, match=">= 1"):
        laplacian_pyramid(torch.zeros(1, 1, 12, 12), 0)


@pytest.mark.parametrize("d", [1, 2, 4, 8])
def test_subbands_sum_back_and_match_numpy_reference(d):
    band = torch.randn(2, 3, 9, 8, dtype=torch.float64)  # odd and even (Nyquist) sides
    sub = directional_subbands(band, d)
    assert tuple(sub.shape) == (2, 3, d, 9, 8)
    torch.testing.assert_close(sub.sum(dim=2), band, atol=1e-12, rtol=0)
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(
                sub[i, j].numpy(), _np_subbands(band[i, j].numpy(), d), atol=1e-12
            )


def _grating(kx: int, ky: int, size: int = 64) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return torch.cos(2 * math.pi * (kx * x + ky * y) / size).double()[None, None]


@pytest.mark.parametrize("degrees", [0, 20, 45, 70, 90, 112.5, 135, 160, 175])
def test_grating_energy_lands_in_its_wedge(degrees):
    d = 8
    theta = math.radians(degrees)
    kx, ky = round(12 * math.cos(theta)), round(12 * math.sin(theta))
    actual = math.atan2(ky, kx) % math.pi  # integer wave numbers: no spectral leakage
    expected = round(actual * d / math.pi) % d
    edge = (actual * d / math.pi) % 1
    assert abs(edge - 0.5) > 0.05  # not on a wedge boundary, where both sides hold 1/2
    energy = (directional_subbands(_grating(kx, ky), d) ** 2).sum(dim=(0, 1, 3, 4))
    assert int(energy.argmax()) == expected
    assert energy[expected] / energy.sum() > 0.5


def test_contourlet_shapes_and_fine_grating_in_level_one():
    x = _grating(-13, 13)  # 135 degrees, 0.29 cycles/px: a fine texture -> level-1 band
    levels = contourlet(x, levels=2, directions=8)
    assert [tuple(s.shape) for s in levels] == [(1, 1, 8, 64, 64), (1, 1, 8, 32, 32)]
    energy = [(s**2).sum() for s in levels]
    assert energy[0] > 10 * energy[1]
    assert int((levels[0] ** 2).sum(dim=(0, 1, 3, 4)).argmax()) == 6  # 135 / 22.5


@pytest.mark.parametrize("d", [0, 3, 6, -2, 2.0])
def test_directions_must_be_a_power_of_two(d):
    with pytest.raises(ValueError, match="power of two"):
        directional_subbands(torch.zeros(1, 1, 8, 8), d)


def test_gradcheck_pyramid_and_subbands():
    x = torch.randn(1, 1, 7, 6, dtype=torch.float64, requires_grad=True)

    def pyramid(t):
        bands, low = laplacian_pyramid(t, 2)
        return (*bands, low)

    assert torch.autograd.gradcheck(pyramid, (x,))
    b = torch.randn(1, 1, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: directional_subbands(t, 4), (b,))


@pytest.mark.parametrize("size, d", [((8, 8), 4), ((7, 10), 8), ((9, 9), 2), ((6, 11), 1)])
def test_structural_loss_matches_numpy_and_is_zero_when_equal(size, d, moments_path):
    # The loss is computed in closed form from the spectrum; the reference builds every sub-band
    # in space (inverse FFT, real part) and standardises it. Odd and even sizes (the Nyquist
    # row/column of even sizes is where the two could part).
    s, t = torch.randn(2, 2, *size), torch.randn(2, 2, *size)
    expected = _np_structural(s.double().numpy(), t.double().numpy(), levels=2, d=d)
    got = structural_texture_loss(s, t, levels=2, directions=d)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(expected, rel=1e-4)
    assert structural_texture_loss(t, t.clone()).item() == pytest.approx(0.0, abs=1e-10)


def test_structural_loss_gradient_matches_the_explicit_subbands(moments_path):
    def explicit(s, t):  # the definition: build the sub-bands, standardise, MSE
        pairs = list(zip(contourlet(s, 2, 8), contourlet(t, 2, 8)))
        with torch.no_grad():  # eps: 1e-6 x the larger mean sub-band variance of the sample
            refs = [
                torch.cat([x.var((-2, -1), False).flatten(1) for x in side], 1).mean(1)
                for side in zip(*pairs)
            ]
            eps = 1e-6 * torch.maximum(*refs).view(-1, 1, 1, 1, 1)
        total = 0
        for a, b in pairs:
            za = (a - a.mean((-2, -1), True)) / (a.var((-2, -1), False, True) + eps).sqrt()
            zb = (b - b.mean((-2, -1), True)) / (b.var((-2, -1), False, True) + eps).sqrt()
            total = total + ((za - zb) ** 2).mean(dim=(0, 1, 3, 4)).sum()
        return total

    t = torch.randn(2, 3, 10, 12)
    s1 = (t + 0.5 * torch.randn_like(t)).requires_grad_()
    s2 = s1.detach().clone().requires_grad_()
    structural_texture_loss(s1, t).backward()
    explicit(s2, t).backward()
    assert s1.grad.abs().max() > 0
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-3, atol=1e-6)


def test_structural_loss_is_invariant_to_teacher_channel_scale(moments_path):
    # Invariant up to the eps on the variances: eps is 1e-6 x the sample's mean sub-band variance
    # (the larger side's), which the 20x channel raises ~100-fold, so eps/var of the other
    # channels grows to ~1e-4 and the loss moves by ~7e-4 relative here; without the
    # standardisation a 20x channel would change it by orders of magnitude.
    t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    s = t + 0.3 * torch.randn(t.shape, generator=torch.Generator().manual_seed(1))
    scale = torch.tensor([0.5, 1.0, 3.0, 20.0]).view(1, 4, 1, 1)
    base = structural_texture_loss(s, t).item()
    assert structural_texture_loss(s, t * scale).item() == pytest.approx(base, rel=2e-3)
    assert structural_texture_loss(s, t + torch.randn_like(t)).item() > 2 * base  # not blind


@pytest.mark.parametrize("student_size", [6, 16])
def test_structural_loss_resizes_the_student(student_size, moments_path):
    t = torch.randn(2, 3, 12, 12)
    s = torch.randn(2, 3, student_size, student_size, requires_grad=True)
    resized = F.interpolate(s.detach(), size=(12, 12), mode="bilinear", align_corners=False)
    loss = structural_texture_loss(s, t)
    assert loss.item() == pytest.approx(structural_texture_loss(resized, t).item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_structural_loss_channel_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3, 12, 12\).*\(2, 4, 12, 12\)"):
        structural_texture_loss(torch.randn(2, 3, 12, 12), torch.randn(2, 4, 12, 12))


def test_structural_loss_paths_agree_at_the_default_map_size_and_above_the_threshold(
    monkeypatch,
):
    # The default config's low map (12x12) takes the matrix path and a 24x24 one the FFT path;
    # forcing each onto the other gives the same loss and gradient.
    assert 12 * 12 <= contourlet_module._DENSE_MAX_PIXELS < 24 * 24
    for size in (12, 24):
        t = torch.randn(2, 4, size, size)
        s = (t + torch.randn_like(t)).requires_grad_()
        results = []
        for limit in (0, 10**6):
            monkeypatch.setattr(contourlet_module, "_DENSE_MAX_PIXELS", limit)
            loss = structural_texture_loss(s, t)
            (grad,) = torch.autograd.grad(loss, s)
            results.append((loss.detach(), grad))
        torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("size", [(3, 3), (7, 10), (12, 12)])
def test_laplacian_band_is_the_pyramids_first_band(size):
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    torch.testing.assert_close(laplacian_band(x), laplacian_pyramid(x, 1)[0][0])
    with pytest.raises(ValueError, match="at most 0 levels"):
        laplacian_band(torch.zeros(1, 1, 2, 5))


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_structural_loss_is_invariant_to_the_feature_scale(scale, moments_path):
    # The eps on the variances is relative to the features' scale: multiplying both maps by one
    # factor leaves L_str unchanged (an absolute eps 1e-6 gave about half the loss at 1e-3).
    g = torch.Generator().manual_seed(3)
    t = torch.randn(2, 4, 12, 12, generator=g)
    s = t + torch.randn(t.shape, generator=g)
    base = structural_texture_loss(s, t).item()
    assert base > 1
    assert structural_texture_loss(s * scale, t * scale).item() == pytest.approx(base, rel=1e-5)


def test_structural_loss_of_flat_maps_is_finite(moments_path):
    flat = torch.ones(1, 2, 8, 8)
    assert structural_texture_loss(flat, flat.clone()).item() == 0.0
    s = torch.zeros(1, 2, 8, 8, requires_grad=True)
    loss = structural_texture_loss(s, torch.randn(1, 2, 8, 8))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
