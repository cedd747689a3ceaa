"""Segmentation metrics: confusion matrix, mIoU, pixel accuracy, boundary IoU.

Confusion matrices and boundary counts are summed (not averaged) across batches and workers, so
the metric over a split is exact however the split was divided.
"""

from __future__ import annotations

import io
import math

import torch
import torch.nn.functional as F
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


def boundary_band(masks: Tensor, width: int) -> Tensor:
    """(N, H, W) bool -> (N, H, W) bool: the pixels of each mask within `width` pixels
    (Chebyshev distance, i.e. a (2*width+1) square) of a pixel outside it, where everything
    beyond the image border counts as outside. That is the mask minus its erosion by the square:
    Boundary IoU's G_d ∩ G (Cheng et al. 2021), as their reference `mask_to_boundary` computes
    it with `width` iterations of a 3x3 erosion after padding the mask with one row/column of
    zeros. Here the erosion is one separable max-pool of the complement, padded with "outside"."""
    if width < 1:
        raise ValueError(f"boundary width must be >= 1 pixel, got {width}")
    k = 2 * width + 1
    outside = (~masks).unsqueeze(1).float()
    outside = F.pad(outside, (width, width, width, width), value=1.0)
    near = F.max_pool2d(F.max_pool2d(outside, (k, 1), stride=1), (1, k), stride=1)
    return masks & (near.squeeze(1) > 0)


def boundary_counts(
    pred: Tensor,
    target: Tensor,
    num_classes: int,
    width: int,
    ignore_index: int = 255,
    chunk: int = 8,
) -> Tensor:
    """(2, K) int64: row 0 the per-class intersections, row 1 the unions, of the boundary bands
    (`boundary_band`) of prediction and target — Boundary IoU per class, summed over images.

    pred, target: (B, H, W) or (H, W) integer maps. For class c the bands are those of
    `target == c` and `pred == c` (so ignore pixels are outside the target's class masks, like
    any other class); pixels whose target is `ignore_index` are then left out of both counts, as
    in `confusion_matrix`. `chunk` classes are processed at a time (memory: B*chunk*H*W floats).
    Runs on the tensors' device.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if pred.dim() == 2:
        pred, target = pred.unsqueeze(0), target.unsqueeze(0)
    if pred.dim() != 3:
        raise ValueError(f"boundary counts need (B, H, W) maps, got {tuple(pred.shape)}")
    pred, target = pred.long(), target.long()
    valid = target != ignore_index
    labels = target[valid]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"target has class ids outside [0, {num_classes}) other than ignore")
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= num_classes):
        raise ValueError(f"prediction has class ids outside [0, {num_classes})")
    counts = torch.zeros(2, num_classes, dtype=torch.int64, device=pred.device)
    # Only classes in the target (valid pixels) or the prediction can have a band.
    present = torch.unique(torch.cat([labels, pred.reshape(-1)]))
    b, h, w = pred.shape
    for start in range(0, present.numel(), chunk):
        ids = present[start : start + chunk]
        shape = (b, ids.numel(), h, w)
        gt = boundary_band((target.unsqueeze(1) == ids.view(1, -1, 1, 1)).reshape(-1, h, w), width)
        pr = boundary_band((pred.unsqueeze(1) == ids.view(1, -1, 1, 1)).reshape(-1, h, w), width)
        gt, pr = gt.reshape(shape), pr.reshape(shape)
        keep = valid.unsqueeze(1)
        counts[0, ids] += (gt & pr & keep).sum((0, 2, 3))
        counts[1, ids] += ((gt | pr) & keep).sum((0, 2, 3))
    return counts


def boundary_iou(counts: Tensor) -> tuple[float, Tensor]:
    """(mean boundary IoU, per-class) from summed `boundary_counts`. Classes with an empty union
    (no band in target nor prediction) are NaN and excluded from the mean, as in `miou`."""
    inter, union = counts[0].double(), counts[1].double()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))
    present = ~torch.isnan(iou)
    mean = float(iou[present].mean()) if present.any() else float("nan")
    return mean, iou


def _percent(value: float) -> str:
    return "    n/a" if math.isnan(value) else f"{100 * value:7.2f}"


def format_table(
    confusion: Tensor,
    class_names: list[str],
    boundary: Tensor | None = None,
    boundary_width: int | None = None,
) -> str:
    """Per-class IoU, mIoU and pixel accuracy as a plain-text table; with `boundary` (summed
    `boundary_counts`) a second column of boundary IoU, headed with its band width in pixels."""
    mean, iou = miou(confusion)
    width = max(12, *(len(n) for n in class_names))
    columns = [iou.tolist()]
    header = f"{'class':<{width}}  {'IoU':>7}"
    if boundary is not None:
        b_mean, b_iou = boundary_iou(boundary)
        columns.append(b_iou.tolist())
        label = "bIoU" if boundary_width is None else f"bIoU@{boundary_width}px"
        header += f"  {label:>10}"
    rule = "-" * len(header)
    lines = [header, rule]
    for k, name in enumerate(class_names):
        line = f"{name:<{width}}  {_percent(columns[0][k])}"
        if boundary is not None:
            line += f"  {_percent(columns[1][k]):>10}"
        lines.append(line)
    lines.append(rule)
    mean_line = f"{'mIoU':<{width}}  {100 * mean:7.2f}"
    if boundary is not None:
        mean_line += f"  {_percent(b_mean):>10}"
    lines.append(mean_line)
    lines.append(f"{'pixel acc':<{width}}  {100 * pixel_accuracy(confusion):7.2f}")
    return "\n".join(lines)


def confusion_png(confusion: Tensor, class_names: list[str], cell: int | None = None) -> bytes:
    """A PNG heat map of the confusion matrix normalised per row (each target class sums to 1:
    the diagonal is the class's recall), white = 0 to dark blue = 1, with the class names on
    the rows (target) and their indices on the columns (prediction); percentages are written in
    the cells when they are large enough. `cell` (pixels) defaults to 28, smaller for many
    classes. Uses Pillow only."""
    from PIL import Image, ImageDraw

    conf = confusion.double()
    rows = conf / conf.sum(1, keepdim=True).clamp(min=1)
    k = len(class_names)
    cell = cell or max(8, min(28, 1400 // max(k, 1)))
    footer = "rows normalised (recall on the diagonal)"
    left = 8 + 6 * max(len("target \\ pred"), *(len(n) for n in class_names))
    top = 36
    size = (max(left + k * cell + 8, 12 + 6 * len(footer)), top + k * cell + 22)
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.text((6, 6), "target \\ pred", fill="black")
    draw.text((6, top + k * cell + 6), footer, fill="black")
    for j in range(k):
        if cell >= 16 or j % 5 == 0:
            draw.text((left + j * cell + 2, top - 14), str(j), fill="black")
    for i, name in enumerate(class_names):
        y = top + i * cell
        if cell >= 12 or i % 2 == 0:
            draw.text((6, y + cell // 2 - 5), f"{i} {name}", fill="black")
        for j in range(k):
            v = float(rows[i, j])
            colour = tuple(int(255 - v * (255 - c)) for c in (8, 48, 107))
            x = left + j * cell
            grid = (200, 200, 200) if cell >= 12 else None
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour, outline=grid)
            if cell >= 24 and v > 0:
                draw.text(
                    (x + 2, y + cell // 2 - 5),
                    f"{100 * v:.0f}",
                    fill="white" if v > 0.5 else "black",
                )
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()
