"""The semi-supervised base: FixMatch-style pseudo labels from the EMA teacher, with CutMix.

The teacher predicts on the *weak* view of an unlabeled image (random scale/crop/flip); its
argmax is a pseudo label where the softmax confidence reaches the threshold (0.95), and the
student learns it on the *strong* view (the same crop after colour jitter, grayscale, blur — done
in the data tasks, `components.data.transforms.strong_photometric` — and CutMix, done here on the
worker because it mixes two images of a batch). Padding of the crop is never a pseudo label.

CutMix (Yun et al., 2019) pastes a box of image j into image i. The box is given in fractions of
the height and width, so the very same box mixes the strong images, the teacher's pseudo labels
and confidences, and feature maps at any resolution: what the student sees at a pixel and the
label it is asked to predict there always come from the same source image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def pseudo_labels(
    logits: Tensor, threshold: float, size: tuple[int, int] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher logits (B, K, h, w) -> (labels (B,H,W) int64, confidence (B,H,W), mask (B,H,W) bool).

    Logits are upsampled (bilinear) to `size` before the softmax; `mask` is confidence >=
    threshold: exactly the pixels the unsupervised loss uses.
    """
    if size is not None and logits.shape[-2:] != torch.Size(size):
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    prob = logits.float().softmax(dim=1)
    confidence, labels = prob.max(dim=1)
    return labels, confidence, confidence >= threshold


def confident_ce(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Cross-entropy of student logits on the pseudo labels, averaged over *all* pixels with the
    unconfident ones contributing 0 (FixMatch's normalisation: the loss grows with the share of
    confident pixels). logits (B,K,h,w) are upsampled to the labels' (H,W)."""
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    per_pixel = F.cross_entropy(logits.float(), labels, reduction="none")
    return (per_pixel * mask.float()).mean()


def cutmix_boxes(
    batch: int, apply_prob: float, generator: torch.Generator | None = None
) -> list[tuple[float, float, float, float] | None]:
    """One box per image (None = not mixed), fractions (y0, y1, x0, x1) of the height/width.

    The box area is a share r ~ U(0.02, 0.4) of the image with aspect ratio in [0.3, 1/0.3]
    (UniMatch's protocol), clipped to the image."""
    boxes: list[tuple[float, float, float, float] | None] = []
    for _ in range(batch):
        u = torch.rand(4, generator=generator).tolist()
        if u[0] >= apply_prob:
            boxes.append(None)
            continue
        area = 0.02 + 0.38 * u[1]
        ratio = math.exp(math.log(0.3) + (math.log(1 / 0.3) - math.log(0.3)) * u[2])
        h = min(1.0, math.sqrt(area * ratio))
        w = min(1.0, math.sqrt(area / ratio))
        y0 = u[3] * (1.0 - h)
        x0 = torch.rand(1, generator=generator).item() * (1.0 - w)
        boxes.append((y0, y0 + h, x0, x0 + w))
    return boxes


def box_mask(box: tuple[float, float, float, float], height: int, width: int) -> Tensor:
    """(height, width) bool mask of a fractional box at this resolution (edges rounded half up;
    at a coarser resolution an edge off the coarse grid moves by under one coarse pixel)."""
    y0, y1, x0, x1 = box
    r0, r1 = math.floor(y0 * height + 0.5), math.floor(y1 * height + 0.5)
    c0, c1 = math.floor(x0 * width + 0.5), math.floor(x1 * width + 0.5)
    m = torch.zeros(height, width, dtype=torch.bool)
    m[r0:r1, c0:c1] = True
    return m


def cutmix(
    x: Tensor, boxes: list[tuple[float, float, float, float] | None], partner: Tensor | None = None
) -> Tensor:
    """Paste, for each i with a box, the box of `partner[i]` into `x[i]` (any (B, ..., H, W)).

    `partner` defaults to `x` rolled by one along the batch (image i takes from image i−1), so
    mixing images, labels, confidences and features with the same boxes keeps them aligned.
    """
    if len(boxes) != x.shape[0]:
        raise ValueError(f"{len(boxes)} boxes for a batch of {x.shape[0]}")
    if partner is None:
        partner = x.roll(1, dims=0)
    out = x.clone()
    height, width = x.shape[-2:]
    for i, box in enumerate(boxes):
        if box is None:
            continue
        m = box_mask(box, height, width).to(x.device)
        out[i] = torch.where(m, partner[i], x[i])
    return out


__all__ = ["box_mask", "confident_ce", "cutmix", "cutmix_boxes", "pseudo_labels"]
