"""Diagnostics of a weakly supervised network, against the masks it never trained on.

    report = diagnose(model, rows, num_classes, cfg.method.weakly)    # rows: iter_rows(...)
    report["cam_miou"], report["pseudo_miou"], report["cls_map"], report["cls_accuracy"]

WSSS papers report the quality of the CAMs and of the pseudo labels on the *train* split (the
images the network learnt from, scored against their masks) next to the segmentation mIoU on val.
Here, per whole image (no crop, no augmentation), with the network in eval mode:

- CAM labels: multi-scale + flip CAMs of the image's classes, background score
  (high + low) / 2 (0.45 with the defaults, AFA's evaluation score), argmax, no refinement.
- Pseudo labels: exactly the training rule (`pseudo_labels.pseudo_labels`: both thresholds, the
  configured refinement); pixels left ignore are not scored, `pseudo_labeled` is their share.
- Classification: mAP over the foreground classes (average precision of the sigmoid scores,
  classes without a positive image skipped) and the accuracy of the 0.5-thresholded labels
  (per image and class).

Runs in the calling process, one image at a time (images differ in size in real datasets).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from components.data.shards import iter_shard_tables
from components.data.transforms import check_row, image_label_vector, normalize
from components.metrics import confusion_matrix, miou
from components.schema import WeaklyConfig
from components.weakly.cam import multiscale_cam
from components.weakly.pseudo_labels import pseudo_labels
from components.weakly.tscd import refine_function, softmax_before_refine, to_unit_range


def iter_rows(
    root: str, split: str, num_classes: int, limit: int | None = None, ignore_index: int = 255
) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(id, image (H, W, 3) uint8, mask (H, W), labels (K-1,)) of a split's usable rows, read
    one shard at a time; rows without a mask or with bad data are skipped."""
    seen = 0
    for _, table in iter_shard_tables(root, split, ["id", "image", "mask", "image_labels"]):
        for row in table.to_pylist():
            if limit is not None and seen >= limit:
                return
            labels = image_label_vector(row["image_labels"], num_classes)
            if row["mask"] is None or isinstance(labels, str):
                continue
            decoded = check_row(row["image"], row["mask"], num_classes, ignore_index)
            if isinstance(decoded, str):
                continue
            seen += 1
            yield row["id"], decoded[0], decoded[1], labels


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """AP of one class: mean precision at the rank of each positive (scores descending)."""
    order = np.argsort(-scores, kind="stable")
    hits = positives[order].astype(bool)
    if not hits.any():
        return float("nan")
    ranks = np.flatnonzero(hits) + 1
    return float(np.mean(np.arange(1, len(ranks) + 1) / ranks))


@torch.no_grad()
def diagnose(
    model: nn.Module,
    rows,
    num_classes: int,
    weakly: WeaklyConfig,
    ignore_index: int = 255,
) -> dict[str, float]:
    """CAM mIoU, pseudo-label mIoU (and labeled share), classification mAP and accuracy over
    `rows` ((id, image, mask, labels) tuples, as `iter_rows` gives)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    refine_fn = refine_function(weakly)
    cam_conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    pseudo_conf = torch.zeros_like(cam_conf)
    labeled, pixels = 0, 0
    scores, targets = [], []
    mid = 0.5 * (weakly.high_threshold + weakly.low_threshold)
    for _, image, mask, labels in rows:
        x = torch.from_numpy(normalize(image[None])).to(device)
        y = torch.from_numpy(labels[None]).to(device)
        truth = torch.from_numpy(mask.astype(np.int64)[None]).to(device)
        scores.append(torch.sigmoid(model(x)["cls_logits"].float())[0].cpu().numpy())
        targets.append(labels)
        cams = (
            multiscale_cam(model.cam, x, tuple(weakly.cam_scales), weakly.cam_flip)
            * y[:, :, None, None]
        )
        rgb = to_unit_range(x)
        area = torch.ones_like(truth, dtype=torch.bool)
        cam_label = pseudo_labels(cams, y, rgb, area, high=mid, low=mid, refine_fn=None)
        cam_conf += confusion_matrix(cam_label, truth, num_classes, ignore_index).cpu()
        plabel = pseudo_labels(
            cams,
            y,
            rgb,
            area,
            high=weakly.high_threshold,
            low=weakly.low_threshold,
            refine_fn=refine_fn,
            ignore_index=ignore_index,
            softmax_scores=softmax_before_refine(weakly),
        )
        scored = truth.masked_fill(plabel == ignore_index, ignore_index)
        pseudo_conf += confusion_matrix(
            plabel.masked_fill(plabel == ignore_index, 0), scored, num_classes, ignore_index
        ).cpu()
        known = truth != ignore_index
        labeled += int((known & (plabel != ignore_index)).sum())
        pixels += int(known.sum())
    model.train(was_training)
    if not targets:
        raise ValueError("no usable rows (with a mask and image_labels) to diagnose")
    s, t = np.stack(scores), np.stack(targets)
    aps = [average_precision(s[:, c], t[:, c]) for c in range(t.shape[1])]
    aps = [a for a in aps if not np.isnan(a)]
    return {
        "cam_miou": miou(cam_conf)[0],
        "pseudo_miou": miou(pseudo_conf)[0],
        "pseudo_labeled": labeled / max(1, pixels),
        "cls_map": float(np.mean(aps)) if aps else float("nan"),
        "cls_accuracy": float(((s >= 0.5) == (t > 0.5)).mean()),
        "images": len(targets),
    }


__all__ = ["average_precision", "diagnose", "iter_rows"]
