"""The semi-supervised base: FixMatch-style pseudo labels from the EMA teacher, with CutMix.

The teacher predicts on the *weak* view of an unlabeled image (random scale/crop/flip); its
argmax is a pseudo label where the softmax confidence reaches the threshold (0.95), and the
student learns it on the *strong* view (the same crop after colour jitter, grayscale, blur — done
in the data tasks, `components.data.transforms.strong_photometric` — and CutMix, done here on the
worker because it mixes two images of a batch). Padding of the crop is never a pseudo label.

CutMix (Yun et al., 2019) pastes a box of a partner image into image i. The box is given in
fractions of the height and width, so the very same box mixes the strong images, the teacher's
pseudo labels and confidences, and feature maps at any resolution: what the student sees at a
pixel and the label it is asked to predict there always come from the same source image. The
partner of image i is image i of another batch (`SemiSupervised` keeps the previous step's
unlabeled batch for it, as UniMatch draws a second unlabeled batch), so a batch of one mixes too.
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


def confident_ce(logits: Tensor, labels: Tensor, mask: Tensor, area: Tensor) -> Tensor:
    """Cross-entropy of student logits on the pseudo labels: summed over the confident pixels
    (`mask`) and divided by the number of real pixels (`area`, bool: not crop padding, not an
    undecodable row), so unconfident real pixels count 0 and padding counts nowhere.

    UniMatch's normalisation (LiheYoung/UniMatch@0324f3d, unimatch.py L176-178 and fixmatch.py
    L162-164: `loss.sum() / (ignore_mask_cutmixed != 255).sum()`, where `ignore_mask` is 255
    exactly on the crop padding, dataset/semi.py L42, L63, L69). Dividing by all pixels instead
    would down-weight crops with padding. With no real pixel the loss is 0. logits (B,K,h,w) are
    upsampled to the labels' (H,W); `mask` must lie inside `area`.
    """
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    per_pixel = F.cross_entropy(logits.float(), labels, reduction="none")
    return (per_pixel * (mask & area).float()).sum() / area.float().sum().clamp(min=1.0)


CUTMIX_AREA = (0.02, 0.4)  # box area, a share of the image (UniMatch transform.py L66, L71)
CUTMIX_RATIO = (0.3, 1 / 0.3)  # box height / width, drawn uniformly (transform.py L66, L73)


def box_from_uniforms(
    u_area: float, u_ratio: float, u_y: float, u_x: float
) -> tuple[float, float, float, float] | None:
    """One draw of UniMatch's CutMix box from four U(0, 1) numbers; None = rejected (redraw).

    LiheYoung/UniMatch@0324f3d dataset/transform.py L66-82 (`obtain_cutmix_box`), in fractions
    of a square crop: area s ~ U(0.02, 0.4) (L71, drawn once per box), then repeatedly: ratio
    r ~ U(0.3, 1/0.3) (uniform, not log-uniform; L73), w = sqrt(s / r), h = sqrt(s · r)
    (L74-75), top-left corner uniform over the whole image (L76-77), kept only if the box fits
    (L79-80). The rejection also reweights r towards boxes that fit, and the box is never
    clipped, so its area is always s. UniMatch truncates w and h to whole pixels (int(), L74-75);
    here the fractional box is rounded at each resolution by `box_mask`.
    """
    area = CUTMIX_AREA[0] + (CUTMIX_AREA[1] - CUTMIX_AREA[0]) * u_area
    ratio = CUTMIX_RATIO[0] + (CUTMIX_RATIO[1] - CUTMIX_RATIO[0]) * u_ratio
    h, w = math.sqrt(area * ratio), math.sqrt(area / ratio)
    if u_y + h > 1.0 or u_x + w > 1.0:
        return None
    return (u_y, u_y + h, u_x, u_x + w)


def cutmix_boxes(
    batch: int, apply_prob: float, generator: torch.Generator | None = None
) -> list[tuple[float, float, float, float] | None]:
    """One box per image (None = not mixed), fractions (y0, y1, x0, x1) of the height/width.

    Each image gets a box with probability `apply_prob` (UniMatch transform.py L68), drawn by
    `box_from_uniforms` until one fits (L72-80)."""
    boxes: list[tuple[float, float, float, float] | None] = []
    for _ in range(batch):
        u_apply, u_area = torch.rand(2, generator=generator).tolist()
        if u_apply >= apply_prob:
            boxes.append(None)
            continue
        box = None
        while box is None:
            box = box_from_uniforms(u_area, *torch.rand(3, generator=generator).tolist())
        boxes.append(box)
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

    `partner` (same shape as `x`) defaults to `x` rolled by one along the batch (image i takes
    from image i−1; with a batch of one that is the image itself, a no-op). Mixing images, labels,
    confidences and features with the same boxes and partners keeps them aligned.
    """
    if len(boxes) != x.shape[0]:
        raise ValueError(f"{len(boxes)} boxes for a batch of {x.shape[0]}")
    if partner is None:
        partner = x.roll(1, dims=0)
    elif partner.shape != x.shape:
        raise ValueError(f"partner {tuple(partner.shape)} for {tuple(x.shape)}")
    out = x.clone()
    height, width = x.shape[-2:]
    for i, box in enumerate(boxes):
        if box is None:
            continue
        m = box_mask(box, height, width).to(x.device)
        out[i] = torch.where(m, partner[i], x[i])
    return out


__all__ = [
    "CUTMIX_AREA",
    "CUTMIX_RATIO",
    "box_from_uniforms",
    "box_mask",
    "confident_ce",
    "cutmix",
    "cutmix_boxes",
    "pseudo_labels",
]
