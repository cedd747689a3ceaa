"""Whole-split evaluation: predictions -> summed confusion matrix (and boundary IoU counts).

    confusion = predict_confusion(model, batches, num_classes, ignore_index, amp_dtype)
    counts = evaluate_counts(model, batches, num_classes, mode=EvalMode("slide", ...),
                             boundary_width=3)      # counts.confusion, counts.boundary

Both sum integer counts over the batches, so the results of several workers add up exactly
(all-reduce `confusion` and `boundary` with a sum).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from components.inference import EvalMode, infer_logits
from components.metrics import boundary_counts, confusion_matrix


@dataclass
class EvalCounts:
    """Summed over a split, on the CPU: `confusion` (K, K) int64 (rows = target); `boundary`
    (2, K) int64 boundary-IoU intersections and unions (`metrics.boundary_counts`) of band
    width `boundary_width` pixels, or None when not asked for."""

    confusion: Tensor
    boundary: Tensor | None = None
    boundary_width: int | None = None


@torch.no_grad()
def evaluate_counts(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    num_classes: int,
    ignore_index: int = 255,
    autocast_dtype: torch.dtype | None = None,
    mode: EvalMode | None = None,
    boundary_width: int | None = None,
) -> EvalCounts:
    """Counts over all batches. Each batch: `image` (B,3,H,W), `mask` (B,H,W) and optionally
    `valid` (B,) — rows that failed to decode are skipped. Logits come from
    `components.inference.infer_logits` under `mode` (None: one whole-image pass), at the mask
    size (bilinear), before the argmax. `boundary_width` (pixels, >= 1) also sums boundary IoU
    counts."""
    if boundary_width is not None and (
        isinstance(boundary_width, bool)
        or int(boundary_width) != boundary_width
        or boundary_width < 1
    ):
        raise ValueError(
            f"boundary width must be a whole number of pixels >= 1, got {boundary_width}"
        )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    boundary = None
    if boundary_width is not None:
        boundary_width = int(boundary_width)
        boundary = torch.zeros(2, num_classes, dtype=torch.int64)
    try:
        for batch in batches:
            images, masks = batch["image"].to(device), batch["mask"].to(device)
            if "valid" in batch:
                keep = batch["valid"].to(device)
                images, masks = images[keep], masks[keep]
            if images.shape[0] == 0:
                continue
            logits = infer_logits(model, images, mode, masks.shape[-2:], autocast_dtype)
            pred = logits.argmax(1)
            confusion += confusion_matrix(pred, masks, num_classes, ignore_index).cpu()
            if boundary is not None:
                boundary += boundary_counts(
                    pred, masks, num_classes, boundary_width, ignore_index
                ).cpu()
    finally:
        model.train(was_training)
    return EvalCounts(confusion, boundary, boundary_width)


@torch.no_grad()
def predict_confusion(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    num_classes: int,
    ignore_index: int = 255,
    autocast_dtype: torch.dtype | None = None,
    mode: EvalMode | None = None,
) -> Tensor:
    """(K,K) confusion over all batches: `evaluate_counts(...).confusion`. With `mode` None (one
    whole-image pass, logits upsampled bilinearly to the mask size) the behaviour is the one
    this function always had."""
    return evaluate_counts(
        model, batches, num_classes, ignore_index, autocast_dtype, mode
    ).confusion
