"""Class activation maps (CAMs) of an image-level classifier: normalisation, multi-scale fusion.

A CAM is the classifier's 1×1 convolution applied to the last feature map *before* global
pooling: one map per foreground class, (B, C, h, w) with C = K − 1 (CAM channel c is class c + 1;
class 0, background, has no CAM — it is a threshold, see `components.weakly.pseudo_labels`).

Usage (teacher side, once per step, no gradients):

    cam_fn = lambda x: model.classifier(model.features(x))     # raw (B, C, h', w'), before ReLU
    cams = multiscale_cam(cam_fn, images, scales=(1.0, 0.5, 1.5), flip=True)   # (B, C, h, w)
    labels = pseudo_labels(cams, cls_labels, image=images, ...)               # (B, H, W)

`multiscale_cam` already returns normalised maps; `normalise_cams` is exposed for single-scale
CAMs (e.g. the online CAM of the training forward).

Faithful (Ru et al., "Learning Affinity from Attention", CVPR 2022; Xu et al., TSCD, AAAI 2023):
    * CAMs are ReLU'd and min–max normalised per image and class to [0, 1].
    * Test-time augmentation over scales and horizontal flips, ReLU per augmented result,
      summed over scales.
Reconstructed (our choices):
    * The two flips of a scale are *summed* like the scales (AFA's released code takes their
      elementwise max); after the final normalisation the two differ only in how disagreeing
      flips are weighted.
    * Everything is fused at the scale-1.0 CAM resolution (h, w) — the feature map — not at the
      image size; `pseudo_labels` upsamples once, at the end. So the first scale must be 1.0.
    * A constant map (nothing activates, or all equal) normalises to zeros instead of NaN.
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


@torch.no_grad()
def multiscale_cam(
    cam_fn: Callable[[Tensor], Tensor],
    images: Tensor,
    scales: Sequence[float] = (1.0, 0.5, 1.5),
    flip: bool = True,
) -> Tensor:
    """Fused, normalised CAMs (B, C, h, w) of images (B, 3, H, W) (AFA / TSCD test-time CAMs).

    `cam_fn(x)` maps images (B, 3, H', W') to raw CAMs (B, C, h', w') — the classifier's 1×1
    conv on the last feature map, before any ReLU. For every scale s the images are resized
    bilinearly (align_corners=False) to (round(s·H), round(s·W)) (at least 1 px); the CAM of that
    image and, with `flip`, the CAM of its horizontal mirror (mirrored back) are each resized
    bilinearly to the scale-1.0 CAM size (h, w) and ReLU'd; all of them are summed and the sum
    is normalised with `normalise_cams`. ReLU before the sum: a class's negative evidence at one
    scale must not cancel its positive evidence at another.

    Raises ValueError if `scales` is empty or its first scale is not 1.0 (it fixes (h, w)).
    """
    scales = tuple(float(s) for s in scales)
    if not scales or scales[0] != 1.0:
        raise ValueError(f"the first CAM scale must be 1.0 (it fixes the CAM size), got {scales}")
    height, width = images.shape[-2:]
    total: Tensor | None = None
    size: tuple[int, int] | None = None
    for s in scales:
        target = _scaled_size(height, width, s)
        x = images
        if target != (height, width):
            x = F.interpolate(images, size=target, mode="bilinear", align_corners=False)
        outs = [cam_fn(x).float()]
        if flip:
            outs.append(cam_fn(x.flip(-1)).float().flip(-1))
        for cam in outs:
            if size is None:  # the first result is the scale-1.0, unflipped CAM
                size = (cam.shape[-2], cam.shape[-1])
            if cam.shape[-2:] != torch.Size(size):
                cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
            cam = F.relu(cam)
            total = cam if total is None else total + cam
    assert total is not None
    return normalise_cams(total)


__all__ = ["multiscale_cam", "normalise_cams"]
