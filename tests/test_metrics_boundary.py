"""Boundary IoU (components/metrics.py): hand-counted values, ignore pixels, a reference."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from components.metrics import (
    boundary_band,
    boundary_counts,
    boundary_iou,
    confusion_png,
    format_table,
)


def _square_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """6x6 maps, class 1 a 4x4 square (rows 1-4), in the target at columns 1-4, in the
    prediction shifted right by one (columns 2-5, touching the right image border)."""
    target = torch.zeros(6, 6, dtype=torch.int64)
    target[1:5, 1:5] = 1
    pred = torch.zeros(6, 6, dtype=torch.int64)
    pred[1:5, 2:6] = 1
    return pred, target


def test_hand_counted_boundary_iou_width_1():
    # d = 1: a pixel of a class mask is in its band when one of its 8 neighbours is outside
    # the mask or outside the image (the image border counts as a contour, as in the paper's
    # reference implementation).
    #
    # Class 1, target T: the 4x4 square minus its 2x2 interior (rows 2-3, cols 2-3) = 12 px:
    #   row 1 cols 1-4, row 4 cols 1-4, rows 2-3 at cols 1 and 4.
    # Class 1, prediction P: square rows 1-4 x cols 2-5; its interior is rows 2-3 x cols 3-4
    #   (col 4's neighbours at col 5 are inside the square) -> 16 - 4 = 12 px:
    #   row 1 cols 2-5, row 4 cols 2-5, rows 2-3 at cols 2 and 5.
    #   T & P: row 1 cols 2-4 (3) + row 4 cols 2-4 (3); rows 2-3 share no column -> 6.
    #   T | P = 12 + 12 - 6 = 18 -> boundary IoU 6/18 = 1/3.
    # Class 0, target: the outer ring of the 6x6 image, 20 px, all on the image border -> all
    #   in the band. Prediction: columns 0-1 (12 px) + rows 0 and 5 at columns 2-5 (8 px) = 20,
    #   each on the border or next to the square -> all in the band.
    #   Intersection: row 0 (6) + row 5 (6) + column 0 rows 1-4 (4) = 16 (column 5 rows 1-4 is
    #   class 1 in the prediction); union 20 + 20 - 16 = 24 -> 16/24 = 2/3.
    pred, target = _square_pair()
    counts = boundary_counts(pred, target, num_classes=3, width=1)
    assert counts.dtype == torch.int64
    assert counts.tolist() == [[16, 6, 0], [24, 18, 0]]
    mean, per_class = boundary_iou(counts)
    assert per_class[0].item() == pytest.approx(2 / 3)
    assert per_class[1].item() == pytest.approx(1 / 3)
    assert torch.isnan(per_class[2])  # absent from both: excluded from the mean
    assert mean == pytest.approx(0.5)
    # The plain IoU of class 1 is much higher (12 / 20): the band measures the contours only.


def test_ignore_pixels_are_left_out():
    # As above with the target's column 5 set to ignore (255).
    # Class 1, target band: unchanged (12 px; ignore is simply "not class 1").
    # Class 1, prediction band: 12 px minus the 4 at column 5 (rows 1-4) = 8 px counted.
    #   Intersection 6 (none at column 5), union 12 + 8 - 6 = 14 -> 3/7.
    # Class 0, target: row 0 cols 0-4 (5) + row 5 cols 0-4 (5) + column 0 rows 1-4 (4) = 14 px,
    #   all on the image border. Prediction band minus column 5 (rows 0 and 5) = 18 px.
    #   All 14 target pixels are in the prediction's band: 14 / (14 + 18 - 14) = 7/9.
    pred, target = _square_pair()
    target[:, 5] = 255
    counts = boundary_counts(pred, target, num_classes=2, width=1)
    assert counts.tolist() == [[14, 6], [18, 14]]
    _, per_class = boundary_iou(counts)
    assert per_class.tolist() == pytest.approx([7 / 9, 3 / 7])


def test_band_width_2():
    # 8x8, class 1 a 6x6 square (rows/cols 1-6), predicted perfectly. d = 2: the square's band
    # is all but its 2x2 centre (rows/cols 3-4: 3+ px from any non-square pixel) = 36 - 4 = 32;
    # class 0 is the 28-px outer ring, all on the border. With d = 1 the square's band would be
    # 36 - 16 = 20.
    target = torch.zeros(8, 8, dtype=torch.int64)
    target[1:7, 1:7] = 1
    assert boundary_counts(target, target, 2, width=2).tolist() == [[28, 32], [28, 32]]
    assert boundary_counts(target, target, 2, width=1).tolist() == [[28, 20], [28, 20]]
    band = boundary_band(target.unsqueeze(0) == 1, 2)[0]
    assert not band[3:5, 3:5].any() and int(band.sum()) == 32


def _reference_band(mask: np.ndarray, width: int) -> np.ndarray:
    """The reference algorithm (boundary-iou-api's mask_to_boundary) in numpy: pad one row and
    column of zeros, erode `width` times with a 3x3 square (nothing beyond the padded array
    erodes), crop, subtract."""
    h, w = mask.shape
    m = np.pad(mask.astype(np.uint8), 1)
    for _ in range(width):
        p = np.pad(m, 1, constant_values=1)
        m = np.min([p[i : i + h + 2, j : j + w + 2] for i in range(3) for j in range(3)], axis=0)
    return mask.astype(bool) & ~m[1 : h + 1, 1 : w + 1].astype(bool)


@pytest.mark.parametrize("width", [1, 2, 5])
def test_matches_iterated_erosion_reference_on_random_maps(width):
    rng = np.random.default_rng(width)
    k = 4
    # Blocky random maps (upsampled noise) so there are regions, plus scattered ignore pixels.
    target = np.kron(rng.integers(0, k, (3, 5, 6)), np.ones((1, 4, 4), dtype=np.int64))[:, :19]
    pred = np.kron(rng.integers(0, k, (3, 5, 6)), np.ones((1, 4, 4), dtype=np.int64))[:, :19]
    target[rng.random(target.shape) < 0.05] = 255
    inter, union = np.zeros(k, np.int64), np.zeros(k, np.int64)
    for t, p in zip(target, pred):
        valid = t != 255
        for c in range(k):
            gb, pb = _reference_band(t == c, width), _reference_band(p == c, width)
            inter[c] += (gb & pb & valid).sum()
            union[c] += ((gb | pb) & valid).sum()
    got = boundary_counts(torch.from_numpy(pred), torch.from_numpy(target), k, width, chunk=3)
    np.testing.assert_array_equal(got.numpy(), np.stack([inter, union]))
    # Summed per image equals computed over the batch: exact across batches and workers.
    parts = sum(
        boundary_counts(torch.from_numpy(p), torch.from_numpy(t), k, width)
        for t, p in zip(target, pred)
    )
    assert torch.equal(parts, got)


def test_bad_inputs():
    pred, target = _square_pair()
    with pytest.raises(ValueError, match="width must be >= 1"):
        boundary_counts(pred, target, 2, width=0)
    with pytest.raises(ValueError, match="differ"):
        boundary_counts(pred[:5], target, 2, width=1)
    with pytest.raises(ValueError, match="outside"):
        boundary_counts(pred, target, 1, width=1)


def test_table_with_boundary_column_and_png():
    pred, target = _square_pair()
    counts = boundary_counts(pred, target, num_classes=2, width=1)
    confusion = torch.tensor([[16, 4], [0, 16]])
    text = format_table(confusion, ["road", "car"], counts, 1)
    lines = text.splitlines()
    assert "bIoU@1px" in lines[0]
    assert lines[2].split() == ["road", "80.00", "66.67"]
    assert lines[3].split() == ["car", "80.00", "33.33"]
    assert lines[5].split() == ["mIoU", "80.00", "50.00"]
    assert "bIoU" not in format_table(confusion, ["road", "car"])

    from PIL import Image

    png = confusion_png(confusion, ["road", "car"])
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.width > 2 * 28 and img.height > 2 * 28
