"""Segmentation metrics: confusion matrix, mIoU, pixel accuracy.

Confusion matrices are summed (not averaged) across batches and workers, so the metric over a
split is exact however the split was divided.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def confusion_matrix(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255
) -> Tensor:
    """(K, K) int64 counts; rows = target class, columns = predicted class.

    pred, target: integer tensors of the same shape. Pixels whose target is `ignore_index` are
    skipped; a target outside [0, K) that is not ignore raises ValueError.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    target = target.reshape(-1).long()
    pred = pred.reshape(-1).long()
    keep = target != ignore_index
    target, pred = target[keep], pred[keep]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(f"target has class ids outside [0, {num_classes}) other than ignore")
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= num_classes):
        raise ValueError(f"prediction has class ids outside [0, {num_classes})")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).to(torch.int64)


def miou(confusion: Tensor) -> tuple[float, Tensor]:
    """(mean IoU, per-class IoU). Classes absent from both target and prediction are NaN in the
    per-class tensor and excluded from the mean."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    present = ~torch.isnan(iou)
    mean = float(iou[present].mean()) if present.any() else float("nan")
    return mean, iou


def pixel_accuracy(confusion: Tensor) -> float:
    total = confusion.sum()
    return float(confusion.diag().sum().double() / total) if total > 0 else float("nan")


def format_table(confusion: Tensor, class_names: list[str]) -> str:
    """Per-class IoU, mIoU and pixel accuracy as a plain-text table."""
    mean, iou = miou(confusion)
    width = max(12, *(len(n) for n in class_names))
    lines = [f"{'class':<{width}}  {'IoU':>7}", "-" * (width + 9)]
    for name, value in zip(class_names, iou.tolist()):
        shown = "    n/a" if math.isnan(value) else f"{100 * value:7.2f}"
        lines.append(f"{name:<{width}}  {shown}")
    lines.append("-" * (width + 9))
    lines.append(f"{'mIoU':<{width}}  {100 * mean:7.2f}")
    lines.append(f"{'pixel acc':<{width}}  {100 * pixel_accuracy(confusion):7.2f}")
    return "\n".join(lines)
