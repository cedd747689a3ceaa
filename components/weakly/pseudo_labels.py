"""Pseudo labels from CAMs and image-level labels: two background thresholds, optional refinement.

Class 0 is background and has no CAM; a constant background score t competes with the
normalised CAMs of the classes present in the image. Two thresholds split the pixels three ways
(AFA's rule):

    foreground under `high`      -> that class          (confident foreground)
    background under both        -> 0                   (confident background)
    background under `high` only -> ignore_index        (uncertain: left out of the loss)

Usage:

    cams = multiscale_cam(cam_fn, images)                          # (B, K−1, h, w) in [0, 1]
    refine_fn = functools.partial(varm.refine, iterations=10)      # or None for raw CAMs
    labels = pseudo_labels(cams, cls_labels, image=images, area=valid, refine_fn=refine_fn)

`cls_labels` (B, K−1) is multi-hot over the foreground classes; `area` (B, H, W) bool is False
on the padding of the crop. The output size (H, W) is taken from `area`, else from `image`, else
from `size`, else it is the CAM size.

Faithful (Ru et al., "Learning Affinity from Attention" (AFA), CVPR 2022; Xu et al., TSCD,
AAAI 2023):
    * CAMs of absent classes are zeroed; background is a constant score at the threshold.
    * Thresholds high = 0.55, low = 0.35 and the three-way combination above.
    * Refinement (PAR / VARM) on the half-size image with the scores resized bilinearly to it,
      then upsampled back to the full size before the argmax; outside the crop -> ignore.
Reconstructed (our choices):
    * Absent classes are kept in the tensor with score 0 and masked to −inf before the argmax,
      so they can never win whatever refine_fn returns (AFA refines only the present channels
      per image, which is equivalent for a linear refinement and needs a per-image loop).
    * With `softmax_scores` (set for AFA's PAR, `refine: par`) the kept channels — background
      and the image's classes — are softmaxed before the refinement, as AFA's
      refine_cams_with_bkg_v2 does (rulixiang/afa utils/camutils.py: `_cams_with_bkg_h[idx,
      valid_key, ...].unsqueeze(0).softmax(dim=1)` before `ref_mod`); without it (VARM, plain)
      the scores are refined as they are.
    * Ties go to the lower class id (torch.argmax), so a CAM exactly at the threshold is
      background.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

RefineFn = Callable[[Tensor, Tensor], Tensor]


def _output_size(
    cams: Tensor, image: Tensor | None, area: Tensor | None, size: tuple[int, int] | None
) -> tuple[int, int]:
    sizes = [tuple(t.shape[-2:]) for t in (area, image) if t is not None]
    if size is not None:
        sizes.append(tuple(size))
    if any(s != sizes[0] for s in sizes):
        raise ValueError(f"area, image and size disagree on the output size: {sizes}")
    return sizes[0] if sizes else tuple(cams.shape[-2:])


def _label_map(
    cams: Tensor,
    present: Tensor,
    threshold: float,
    image_half: Tensor | None,
    refine_fn: RefineFn | None,
    softmax_scores: bool = False,
) -> Tensor:
    """argmax over [background = threshold, CAMs] -> (B, H, W) class ids (AFA's cam_to_label)."""
    b, _, h, w = cams.shape
    scores = torch.cat([cams.new_full((b, 1, h, w), threshold), cams], dim=1)  # (B, K, H, W)
    return _refined_argmax(scores, present, image_half, refine_fn, softmax_scores)


def _refined_argmax(
    scores: Tensor,
    present: Tensor,
    image_half: Tensor | None,
    refine_fn: RefineFn | None,
    softmax_scores: bool = False,
    align_corners: bool = False,
) -> Tensor:
    """scores (B, K, H, W) -> (B, H, W): optionally refined at the half size (the downsampling
    with `align_corners`), absent classes out of the running, argmax."""
    h, w = scores.shape[-2:]
    if refine_fn is not None:
        assert image_half is not None
        small = F.interpolate(
            scores, size=image_half.shape[-2:], mode="bilinear", align_corners=align_corners
        )
        if softmax_scores:  # over the kept channels only; absent ones become exactly 0
            small = small.masked_fill(~present[..., None, None], float("-inf")).softmax(dim=1)
        small = refine_fn(image_half, small * present[..., None, None])
        scores = F.interpolate(small.float(), size=(h, w), mode="bilinear", align_corners=False)
    # Absent classes are out of the running whatever their (refined) score.
    scores = scores.masked_fill(~present[..., None, None], float("-inf"))
    return scores.argmax(dim=1)


@torch.no_grad()
def pseudo_labels(
    cams: Tensor,
    labels: Tensor,
    image: Tensor | None = None,
    area: Tensor | None = None,
    high: float = 0.55,
    low: float = 0.35,
    refine_fn: RefineFn | None = None,
    ignore_index: int = 255,
    size: tuple[int, int] | None = None,
    softmax_scores: bool = False,
) -> Tensor:
    """(B, H, W) int64 pseudo labels in {0..K−1, ignore_index} (AFA §3.3, TSCD §3).

    cams (B, K−1, h, w) normalised to [0, 1]; labels (B, K−1) multi-hot float; image (B, 3, H, W)
    in [0, 1] (needed with `refine_fn`); area (B, H, W) bool, False outside the valid crop.
    The CAMs of absent classes are zeroed and upsampled bilinearly to (H, W). For t in (high,
    low) the scores [t, CAMs] are optionally refined with `refine_fn(image_half, scores_half)` at
    (H//2, W//2) and argmax'd; then label = label_high, ignore_index where background under
    `high` but foreground under `low`, and ignore_index outside `area`. An image without a
    present class is all background inside its area. `softmax_scores`: softmax the kept
    channels (background and present classes) before `refine_fn` (AFA's PAR pipeline).
    """
    if not low <= high:
        raise ValueError(f"need low <= high, got low={low}, high={high}")
    if labels.shape != cams.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match cams {tuple(cams.shape)}")
    if refine_fn is not None and image is None:
        raise ValueError("refine_fn needs the image")
    out_size = _output_size(cams, image, area, size)
    cams = cams.float() * labels.float()[..., None, None]
    if cams.shape[-2:] != torch.Size(out_size):
        cams = F.interpolate(cams, size=out_size, mode="bilinear", align_corners=False)
    # Channel 0 (background) is always present; channel c+1 iff class c+1 is in the image.
    present = torch.cat([labels.new_ones(labels.shape[0], 1), labels], dim=1) > 0

    image_half = None
    if refine_fn is not None:
        half = (max(1, out_size[0] // 2), max(1, out_size[1] // 2))
        image_half = F.interpolate(image.float(), size=half, mode="bilinear", align_corners=False)

    label_high = _label_map(cams, present, high, image_half, refine_fn, softmax_scores)
    label_low = _label_map(cams, present, low, image_half, refine_fn, softmax_scores)
    return _combine(label_high, label_low, area, ignore_index)


def _combine(
    label_high: Tensor, label_low: Tensor, area: Tensor | None, ignore_index: int
) -> Tensor:
    """label_high, ignore where background under high but foreground under low, ignore outside
    the area (AFA's rule)."""
    out = label_high.clone()
    out[(label_high == 0) & (label_low != 0)] = ignore_index
    if area is not None:
        out[~area.bool()] = ignore_index
    return out


@torch.no_grad()
def propagated_pseudo_labels(
    scores_high: Tensor,
    scores_low: Tensor,
    labels: Tensor,
    image: Tensor | None = None,
    area: Tensor | None = None,
    refine_fn: RefineFn | None = None,
    ignore_index: int = 255,
) -> Tensor:
    """(B, H, W) pseudo labels from background-stacked scores (B, K, h, w) — AFA's labels from
    the affinity-propagated CAMs (`affinity.propagate_with_background` with the high and the low
    background score).

    Each is upsampled bilinearly to the output size (area's, else image's), refined with
    `refine_fn` at the half size as the CAM labels are (no softmax: the propagated scores are
    already softmax-weighted), argmax'd with absent classes out of the running, and combined by
    the same rule as `pseudo_labels` (rulixiang/afa scripts/dist_train_voc.py, train():
    `refine_cams_with_cls_label(par, ...)` on `aff_cam_l` / `aff_cam_h`, then `refined_aff_label`).
    """
    if scores_high.shape != scores_low.shape:
        raise ValueError(f"scores {tuple(scores_high.shape)} and {tuple(scores_low.shape)} differ")
    if labels.shape[1] + 1 != scores_high.shape[1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match scores with a background")
    if refine_fn is not None and image is None:
        raise ValueError("refine_fn needs the image")
    out_size = _output_size(scores_high, image, area, None)
    present = torch.cat([labels.new_ones(labels.shape[0], 1), labels], dim=1) > 0
    image_half = None
    if refine_fn is not None:
        half = (max(1, out_size[0] // 2), max(1, out_size[1] // 2))
        image_half = F.interpolate(image.float(), size=half, mode="bilinear", align_corners=False)
    maps = []
    for scores in (scores_high, scores_low):
        scores = scores.float() * present[..., None, None]
        if scores.shape[-2:] != torch.Size(out_size):
            scores = F.interpolate(scores, size=out_size, mode="bilinear", align_corners=False)
        # To the half size with align_corners=True: AFA hands the full-size propagated scores to
        # PAR, whose forward resizes them to the half-size image that way (wetr/PAR.py).
        maps.append(_refined_argmax(scores, present, image_half, refine_fn, align_corners=True))
    return _combine(maps[0], maps[1], area, ignore_index)


__all__ = ["propagated_pseudo_labels", "pseudo_labels"]
