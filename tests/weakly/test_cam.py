"""CAM normalisation and multi-scale / flip fusion, against a numpy + skimage reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.transform import resize

from components.weakly.cam import cam_at, multiscale_cam, normalise_cams


def test_normalise_cams_min_max_per_image_and_class():
    g = torch.Generator().manual_seed(0)
    cams = torch.randn(3, 4, 5, 6, generator=g) * 3
    out = normalise_cams(cams)
    assert out.shape == cams.shape
    relu = np.maximum(cams.numpy(), 0.0)
    for b in range(3):
        for c in range(4):
            m = relu[b, c]
            if m.max() == m.min():
                continue
            expected = (m - m.min()) / (m.max() - m.min())
            np.testing.assert_allclose(out[b, c].numpy(), expected, rtol=1e-6, atol=1e-7)
            assert out[b, c].max().item() == 1.0  # exactly
            assert out[b, c].min().item() == 0.0


def test_normalise_cams_constant_map_is_zero_not_nan():
    cams = torch.zeros(2, 3, 4, 4)
    cams[0, 0] = 2.5  # positive constant
    cams[0, 1] = -1.0  # all negative -> ReLU'd to 0
    cams[1, 2, 1, 1] = 4.0  # one non-constant map, to show the others are untouched by it
    out = normalise_cams(cams)
    assert not torch.isnan(out).any()
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    assert (out[mask] == 0).all()
    assert out[1, 2, 1, 1] == 1.0 and out[1, 2].sum() == 1.0


# --- the hand-made network: 4×4 average pooling, then a fixed 1×1 conv to 2 classes -----------
W = np.array([[1.0, -2.0, 0.5], [-0.5, 0.3, 1.5]])  # (C=2, 3)
BIAS = np.array([-0.2, 0.1])


def cam_fn(x: torch.Tensor) -> torch.Tensor:
    feats = F.avg_pool2d(x, 4)
    return F.conv2d(feats, torch.tensor(W, dtype=x.dtype)[:, :, None, None], torch.tensor(BIAS))


def reference_cam(image: np.ndarray, scales, flip: bool) -> np.ndarray:
    """Independent numpy/skimage computation for one (3, H, W) image -> (2, H, W): each raw CAM
    upsampled to the image size, ReLU, summed, min-max (rulixiang/afa utils/camutils.py,
    multi_scale_cam)."""

    def bilinear(a: np.ndarray, size) -> np.ndarray:  # half-pixel bilinear, no antialias
        return np.stack([resize(ch, size, order=1, mode="edge", anti_aliasing=False) for ch in a])

    def net(img: np.ndarray) -> np.ndarray:
        c, h, w = img.shape
        pooled = img.reshape(c, h // 4, 4, w // 4, 4).mean(axis=(2, 4))
        return np.einsum("kc,chw->khw", W, pooled) + BIAS[:, None, None]

    _, height, width = image.shape
    size = (height, width)
    total = np.zeros((2, *size))
    for s in scales:
        img = bilinear(image, (round(height * s), round(width * s)))
        outs = [net(img)]
        if flip:
            outs.append(net(img[:, :, ::-1])[:, :, ::-1])
        for o in outs:
            total += np.maximum(bilinear(o, size), 0.0)
    lo = total.min(axis=(1, 2), keepdims=True)
    hi = total.max(axis=(1, 2), keepdims=True)
    return (total - lo) / np.where(hi > lo, hi - lo, 1.0)


@pytest.mark.parametrize("flip", [True, False])
def test_multiscale_cam_matches_numpy_reference(flip):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64)
    scales = (1.0, 0.5, 1.5)  # 16, 8, 24 px: all multiples of the pooling stride
    out = multiscale_cam(cam_fn, images, scales=scales, flip=flip)
    assert out.shape == (2, 2, 16, 16)
    for b in range(2):
        expected = reference_cam(images[b].numpy(), scales, flip)
        np.testing.assert_allclose(out[b].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_flip_fusion_of_an_asymmetric_map():
    # A CAM that ramps left to right whatever the image: with the flip, ramp + mirrored ramp is
    # constant (-> zeros after normalisation); without it the ramp survives.
    def ramp_fn(x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        # 0, 1, 2, 3: dyadic interpolation weights keep every sum exact in float32.
        return torch.arange(w // 2, dtype=torch.float32).expand(b, 1, h // 2, w // 2).clone()

    images = torch.rand(1, 3, 8, 8)
    flipped = multiscale_cam(ramp_fn, images, scales=(1.0,), flip=True)
    plain = multiscale_cam(ramp_fn, images, scales=(1.0,), flip=False)
    np.testing.assert_allclose(flipped.numpy(), 0.0, atol=1e-6)
    # The 4-px ramp [0, 1, 2, 3] upsampled to 8 px (align_corners=False: source x =
    # (x + 0.5) / 2 - 0.5, clamped at the borders): [0, 1, 3, 5, 7, 9, 11, 12] / 4, then
    # min-max: / 12.
    expected = np.array([0, 1, 3, 5, 7, 9, 11, 12]) / 12
    np.testing.assert_allclose(plain[0, 0, 0].numpy(), expected, atol=1e-6)


def test_scales_in_any_order_but_not_empty_or_negative():
    images = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    a = multiscale_cam(cam_fn, images, scales=(0.5, 1.0))
    b = multiscale_cam(cam_fn, images, scales=(1.0, 0.5))
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError):
        multiscale_cam(cam_fn, images, scales=())
    with pytest.raises(ValueError):
        multiscale_cam(cam_fn, images, scales=(1.0, -0.5))


def test_official_order_upsample_then_relu_then_normalise():
    # A raw 1x2 CAM [-1, 3] to a 1x4 image. Upsampling (align_corners=False, source x =
    # (x + 0.5) / 2 - 0.5 clamped to [0, 1]): x = 0 -> -1, 1 -> -1 + 0.25*4 = 0,
    # 2 -> -1 + 0.75*4 = 2, 3 -> 3; ReLU [0, 0, 2, 3]; min-max [0, 0, 2/3, 1]
    # (the order of rulixiang/afa utils/camutils.py multi_scale_cam: interpolate, relu, then
    # `cam + adaptive_max_pool2d(-cam)` and the division by the max).
    raw = torch.tensor([[[[-1.0, 3.0]]]])
    out = cam_at(raw, (1, 4))
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 0.0, 2 / 3, 1.0]))
    # The previous order (ReLU + min-max at the CAM size, then upsampling) gives
    # [0, 1] -> [0, 0.25, 0.75, 1]: three of four pixels non-zero instead of two.
    old = F.interpolate(normalise_cams(raw), size=(1, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(old[0, 0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))
    # multiscale_cam follows the same order at one scale without flip.
    x = torch.zeros(1, 3, 1, 4)
    fused = multiscale_cam(lambda _: raw, x, scales=(1.0,), flip=False)
    torch.testing.assert_close(fused, out)


def test_tiny_scale_keeps_at_least_one_pixel():
    seen = []

    def spy(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape[-2:]))
        return x.mean(dim=1, keepdim=True)

    multiscale_cam(spy, torch.rand(1, 3, 6, 10), scales=(1.0, 0.01), flip=False)
    assert seen == [(6, 10), (1, 1)]
