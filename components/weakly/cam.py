"""Class activation maps (CAMs) of an image-level classifier: normalisation, multi-scale fusion.

A CAM is the classifier's 1×1 convolution applied to the last feature map *before* global
pooling: one map per foreground class, (B, C, h, w) with C = K − 1 (CAM channel c is class c + 1;
class 0, background, has no CAM — it is a threshold, see `components.weakly.pseudo_labels`).

Usage (teacher side, once per step, no gradients):

    cam_fn = lambda x: model.classifier(model.features(x))     # raw (B, C, h', w'), before ReLU
    cams = multiscale_cam(cam_fn, images, scales=(1.0, 0.5, 1.5), flip=True)   # (B, C, H, W)
    labels = pseudo_labels(cams, cls_labels, image=images, ...)               # (B, H, W)
    cam2 = cam_at(cam_fn(view), view.shape[-2:])     # one raw CAM, the same order (SCD's view)

Order (the official code's): the *raw* CAM is upsampled to the image size first, then ReLU'd,
then min–max normalised at the image size (rulixiang/afa utils/camutils.py, multi_scale_cam:
`F.interpolate(_cam, size=(h,w), ...)` on the model's raw CAM, then `F.relu`, the sum over
scales, then `cam + F.adaptive_max_pool2d(-cam, (1, 1))` and the division by the max). Normalising
at the CAM size and upsampling afterwards is not the same: a bilinear upsampling of a map that
is already in [0, 1] spreads every non-zero cell over its neighbours, so the non-zero region
of a small map widens (test_cam.py has a hand-computed case).

Faithful (Ru et al., "Learning Affinity from Attention", CVPR 2022; Xu et al., TSCD, AAAI 2023):
    * Raw CAMs upsampled bilinearly (align_corners=False) to the image size, then ReLU, then
      min–max per image and class to [0, 1], at the image size.
    * Test-time augmentation over scales and horizontal flips, ReLU per augmented result,
      summed over scales.
Reconstructed (our choices):
    * The two flips of a scale are *summed* like the scales (AFA's released code takes their
      elementwise max); after the final normalisation the two differ only in how disagreeing
      flips are weighted.
    * A scale's image size is round(s·H) (AFA: int(s·H)); the scales may come in any order.
    * A constant map (nothing activates, or all equal) normalises to zeros instead of NaN, and
      the division is by (max − min) exactly (AFA adds 1e-5 to the max).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def normalise_cams(cams: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, C, h, w) in [0, 1]: ReLU, then min–max per image and class (AFA §3.1).

    A non-constant map has min exactly 0 and max exactly 1 (the max element computes
    (max − min) / (max − min)); a constant map becomes all zeros rather than 0/0 = NaN.
    """
    x = F.relu(cams.float())
    lo = x.amin(dim=(-2, -1), keepdim=True)
    span = x.amax(dim=(-2, -1), keepdim=True) - lo
    # Divide by 1 where the span is 0: those maps are (x − lo) = 0 already, so they stay 0.
    return (x - lo) / torch.where(span > 0, span, torch.ones_like(span))


def _scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    return max(1, round(height * scale)), max(1, round(width * scale))


def cam_at(cams: Tensor, size: Sequence[int]) -> Tensor:
    """Raw CAMs (B, C, h, w) -> (B, C, *size) in [0, 1]: bilinear upsampling (align_corners
    False) of the raw maps, then ReLU and min–max (`normalise_cams`), the official order."""
    cams = cams.float()
    if cams.shape[-2:] != torch.Size(tuple(size)):
        cams = F.interpolate(cams, size=tuple(size), mode="bilinear", align_corners=False)
    return normalise_cams(cams)


@torch.no_grad()
def multiscale_cam(
    cam_fn: Callable[[Tensor], Tensor],
    images: Tensor,
    scales: Sequence[float] = (1.0, 0.5, 1.5),
    flip: bool = True,
    size: Sequence[int] | None = None,
) -> Tensor:
    """Fused, normalised CAMs (B, C, H, W) of images (B, 3, H, W) (AFA / TSCD test-time CAMs).

    `cam_fn(x)` maps images (B, 3, H', W') to raw CAMs (B, C, h', w') — the classifier's 1×1
    conv on the last feature map, before any ReLU. For every scale s the images are resized
    bilinearly (align_corners=False) to (round(s·H), round(s·W)) (at least 1 px); the raw CAM of
    that image and, with `flip`, the raw CAM of its horizontal mirror (mirrored back) are each
    resized bilinearly to the output size — the image size (H, W) unless `size` is given — and
    ReLU'd; all of them are summed and the sum is normalised with `normalise_cams` at that size
    (AFA's multi_scale_cam order: upsample, ReLU, sum, min–max). ReLU before the sum: a class's
    negative evidence at one scale must not cancel its positive evidence at another.

    Raises ValueError if `scales` is empty or holds a scale <= 0.
    """
    scales = tuple(float(s) for s in scales)
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"CAM scales must be a non-empty list of positive factors, got {scales}")
    height, width = images.shape[-2:]
    out_size = (height, width) if size is None else (int(size[0]), int(size[1]))
    total: Tensor | None = None
    for s in scales:
        target = _scaled_size(height, width, s)
        x = images
        if target != (height, width):
            x = F.interpolate(images, size=target, mode="bilinear", align_corners=False)
        outs = [cam_fn(x).float()]
        if flip:
            outs.append(cam_fn(x.flip(-1)).float().flip(-1))
        for cam in outs:
            if cam.shape[-2:] != torch.Size(out_size):
                cam = F.interpolate(cam, size=out_size, mode="bilinear", align_corners=False)
            cam = F.relu(cam)
            total = cam if total is None else total + cam
    assert total is not None
    return normalise_cams(total)


__all__ = ["cam_at", "multiscale_cam", "normalise_cams"]
