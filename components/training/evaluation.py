"""Whole-split evaluation: predictions -> summed confusion matrix."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.metrics import confusion_matrix


@torch.no_grad()
def predict_confusion(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    num_classes: int,
    ignore_index: int = 255,
    autocast_dtype: torch.dtype | None = None,
) -> Tensor:
    """(K,K) confusion over all batches. Each batch: `image` (B,3,H,W), `mask` (B,H,W) and
    optionally `valid` (B,) — rows that failed to decode are skipped. Logits are upsampled
    (bilinear) to the mask size before the argmax."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for batch in batches:
        images, masks = batch["image"].to(device), batch["mask"].to(device)
        if "valid" in batch:
            keep = batch["valid"].to(device)
            images, masks = images[keep], masks[keep]
        if images.shape[0] == 0:
            continue
        if autocast_dtype is not None:
            with torch.autocast(device.type, dtype=autocast_dtype):
                logits = model(images)["logits"]
        else:
            logits = model(images)["logits"]
        logits = F.interpolate(
            logits.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False
        )
        pred = logits.argmax(1)
        confusion += confusion_matrix(pred, masks, num_classes, ignore_index).cpu()
    model.train(was_training)
    return confusion
