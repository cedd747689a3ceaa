"""NumPy decode + augmentation of shard rows for Ray Data `map_batches(batch_format="numpy")`.

    ds.map_batches(partial(decode_train_batch, crop_size=64, scale_range=(0.75, 1.5), flip=True,
                           seed=None, num_classes=5), batch_format="numpy")

Every input row yields exactly one output row. A row that cannot be used (undecodable image or
mask, mask size differing from the image, class ids >= num_classes other than ignore) is kept as
an all-zero image with an all-ignore mask and `valid=False`, and its id is logged. Ray Data
batches need equal-length columns, so this keeps the bad-row count exact (`(~valid).sum()`)
while the cross-entropy ignores those rows anyway.

Output columns of `decode_train_batch` / `decode_eval_batch`:
    image  float32 (B, 3, H, W)  normalized with IMAGENET_MEAN / IMAGENET_STD (0 for invalid rows)
    mask   int64   (B, H, W)     class ids, ignore_index where unlabeled, padded or invalid
    id     str     (B,)
    valid  bool    (B,)
With `normalized=False` (every decoder; what the Ray Data pipelines use) the images stay
(B, H, W, 3) uint8 (0 for invalid rows) and masks are uint8: the transfer form, normalised on
the worker's device by `components.data.device.model_batch` to the same numbers.

Seeding, the same for the three training decoders (`decode_train_batch`, `decode_unlabeled_batch`,
`decode_weak_batch`; `decode_eval_batch` has no randomness): with `seed`, the in-batch shuffle
and the augmentation are a pure function of (seed, the batch's ids), so batches differ from one
another but a given batch is reproducible; `seed` may be a tuple of ints (the Ray Data pipelines
pass (data.shuffle_seed, the epoch's execution index): components/data/ingest.py); with
`seed=None` (the default) each call draws fresh OS entropy.
"""

from __future__ import annotations

import logging
import zlib

import numpy as np

from components.data.augment import (
    crop_hw,
    normalize,
    pad_to,
    random_scale_crop_flip,
    strong_photometric,
)
from components.data.images import decode_image, decode_mask
from components.data.shards import DatasetInfo, read_split_table

log = logging.getLogger("segdistill.data")


def check_row(
    image_bytes: bytes | None, mask_bytes: bytes | None, num_classes: int, ignore_index: int = 255
) -> tuple[np.ndarray, np.ndarray] | str:
    """Decode one row: ((H, W, 3) uint8, (H, W) uint8), or the reason it is unusable.

    A missing mask (unlabeled row) becomes an all-ignore mask.
    """
    if image_bytes is None:
        return "image is missing"
    try:
        image = decode_image(image_bytes)
    except ValueError as e:
        return f"undecodable image: {e}"
    if mask_bytes is None:
        return image, np.full(image.shape[:2], ignore_index, np.uint8)
    try:
        mask = decode_mask(mask_bytes)
    except ValueError as e:
        return f"undecodable mask: {e}"
    if mask.shape != image.shape[:2]:
        return f"mask size {mask.shape[0]}x{mask.shape[1]} differs from image size " + (
            f"{image.shape[0]}x{image.shape[1]}"
        )
    counts = np.bincount(mask.ravel(), minlength=256)
    counts[ignore_index] = 0
    if counts[num_classes:].any():
        bad = np.flatnonzero(counts[num_classes:]) + num_classes
        return f"mask has class ids {bad.tolist()} outside 0..{num_classes - 1} (and not ignore)"
    return image, mask


def _decode_rows(
    batch: dict[str, np.ndarray], num_classes: int, ignore_index: int
) -> list[tuple[str, tuple[np.ndarray, np.ndarray] | None]]:
    """(id, decoded pair or None) per row; logs every bad row."""
    ids = [str(i) for i in batch["id"]]
    masks = batch.get("mask")
    rows = []
    for k, row_id in enumerate(ids):
        result = check_row(
            batch["image"][k], None if masks is None else masks[k], num_classes, ignore_index
        )
        if isinstance(result, str):
            log.warning("skipping row %s: %s", row_id, result)
            rows.append((row_id, None))
        else:
            rows.append((row_id, result))
    return rows


def _assemble(
    rows: list[tuple[str, tuple[np.ndarray, np.ndarray] | None]],
    height: int,
    width: int,
    ignore_index: int,
    normalized: bool = True,
) -> dict[str, np.ndarray]:
    """Stack (H, W) pairs into the output columns; None rows become invalid placeholders."""
    images = np.zeros((len(rows), height, width, 3), np.uint8)
    masks = np.full((len(rows), height, width), ignore_index, _mask_dtype(normalized))
    valid = np.zeros(len(rows), bool)
    for k, (_, pair) in enumerate(rows):
        if pair is not None:
            images[k], masks[k], valid[k] = pair[0], pair[1], True
    return {
        "image": _images_out(images, valid, normalized),
        "mask": masks,
        "id": np.array([row_id for row_id, _ in rows], dtype=str),
        "valid": valid,
    }


def _mask_dtype(normalized: bool) -> type:
    return np.int64 if normalized else np.uint8


def _images_out(images: np.ndarray, valid: np.ndarray, normalized: bool) -> np.ndarray:
    """(B, H, W, 3) uint8 as the column: normalised float32 (B, 3, H, W) with invalid rows 0,
    or (`normalized=False`, the transfer form) the uint8 as it is (invalid rows are 0 already)."""
    if not normalized:
        return images
    out = normalize(images)
    out[~valid] = 0.0
    return out


def _augment_rng(seed: int | tuple[int, ...] | None, ids) -> np.random.Generator:
    """The one random generator of a training batch (the seeding rule in the module docstring)."""
    if seed is None:
        return np.random.default_rng()
    key = zlib.crc32("\0".join(map(str, ids)).encode())
    return np.random.default_rng([*(seed if isinstance(seed, tuple) else (seed,)), key])


def _seeded_batch(
    batch: dict[str, np.ndarray], seed: int | tuple[int, ...] | None, shuffle: bool
) -> tuple[np.random.Generator, dict[str, np.ndarray]]:
    """(the batch's generator, the batch with its rows permuted by it when `shuffle`)."""
    rng = _augment_rng(seed, batch["id"])
    if shuffle:
        order = rng.permutation(len(batch["id"]))
        batch = {k: v[order] for k, v in batch.items()}
    return rng, batch


def decode_train_batch(
    batch: dict[str, np.ndarray],
    *,
    crop_size: int | tuple[int, int],
    scale_range: tuple[float, float],
    flip: bool,
    seed: int | tuple[int, ...] | None = None,
    ignore_index: int = 255,
    num_classes: int,
    shuffle: bool = False,
    normalized: bool = True,
) -> dict[str, np.ndarray]:
    """Decode + random scale/crop/flip a batch of shard rows (columns `id`, `image`, `mask`).

    `shuffle` permutes the rows first (the in-batch part of the training shuffle: Ray's local
    shuffle buffer is slow and breaks DDP step parity, so rows are shuffled here instead).

    Output columns (B rows in, B rows out): see the module docstring; (H, W) = the crop.
    `seed`: see the module docstring.
    """
    rng, batch = _seeded_batch(batch, seed, shuffle)
    rows = _decode_rows(batch, num_classes, ignore_index)
    out = []
    for row_id, pair in rows:
        if pair is not None:
            pair = random_scale_crop_flip(
                pair[0], pair[1], crop_size, scale_range, flip, rng, ignore_index
            )
        out.append((row_id, pair))
    return _assemble(out, *crop_hw(crop_size), ignore_index, normalized)


def _crop_with_optional_mask(
    row_id: str,
    image_bytes: bytes | None,
    mask_bytes: bytes | None,
    num_classes: int,
    ignore_index: int,
    crop_size: int | tuple[int, int],
    scale_range: tuple[float, float],
    flip: bool,
    rng: np.random.Generator,
    what: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(image, mask, area) crop of a row whose mask is optional (diagnostics only): a bad mask
    becomes all ignore, an undecodable image makes the row unusable (None, logged)."""
    result = check_row(image_bytes, mask_bytes, num_classes, ignore_index)
    if isinstance(result, str) and mask_bytes is not None:
        result = check_row(image_bytes, None, num_classes, ignore_index)
    if isinstance(result, str):
        log.warning("skipping %s %s: %s", what, row_id, result)
        return None
    return random_scale_crop_flip(
        result[0], result[1], crop_size, scale_range, flip, rng, ignore_index, with_area=True
    )


def decode_unlabeled_batch(
    batch: dict[str, np.ndarray],
    *,
    crop_size: int | tuple[int, int],
    scale_range: tuple[float, float],
    flip: bool,
    strong: tuple[str, ...] | list[str],
    ignore_index: int = 255,
    num_classes: int,
    shuffle: bool = False,
    seed: int | tuple[int, ...] | None = None,
    normalized: bool = True,
) -> dict[str, np.ndarray]:
    """Weak and strong views of unlabeled rows (same crop), for semi-supervised training.

    Output columns: `image` (weak: scale/crop/flip, normalized), `image_strong` (the same crop
    after `strong_photometric`), `area` (B, H, W) bool (False on crop padding), `mask` (the row's
    mask if it has one — for diagnostics only, never a training target — else all ignore),
    `valid`, `id`. A row whose optional mask is bad is still used as unlabeled (its mask becomes
    all ignore); only an undecodable image makes it invalid. `shuffle` as in `decode_train_batch`;
    `seed` (shared by the crop and the strong view): see the module docstring.
    """
    rng, batch = _seeded_batch(batch, seed, shuffle)
    ids = [str(i) for i in batch["id"]]
    masks = batch.get("mask")
    n, (ch, cw) = len(ids), crop_hw(crop_size)
    weak = np.zeros((n, ch, cw, 3), np.uint8)
    strong_views = np.zeros_like(weak)
    diag = np.full((n, ch, cw), ignore_index, _mask_dtype(normalized))
    area = np.zeros((n, ch, cw), bool)
    valid = np.zeros(n, bool)
    for k, row_id in enumerate(ids):
        crop = _crop_with_optional_mask(
            row_id, batch["image"][k], None if masks is None else masks[k], num_classes,
            ignore_index, crop_size, scale_range, flip, rng, "unlabeled row",
        )  # fmt: skip
        if crop is None:
            continue
        image, mask, inside = crop
        weak[k], diag[k], area[k], valid[k] = image, mask, inside, True
        strong_views[k] = strong_photometric(image, strong, rng)
    return {
        "image": _images_out(weak, valid, normalized),
        "image_strong": _images_out(strong_views, valid, normalized),
        "area": area,
        "mask": diag,
        "id": np.array(ids, dtype=str),
        "valid": valid,
    }


def image_label_vector(labels, num_classes: int) -> np.ndarray | str:
    """A row's `image_labels` (class ids present, background 0 included or not) as a (K-1,)
    float32 multi-hot vector of the foreground classes, or the reason it is unusable.

    A list with no foreground id (a background-only image) is valid: all zeros."""
    if labels is None:
        return "image_labels is missing"
    try:
        ids = np.asarray(labels, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        return f"image_labels {list(labels)} is not a list of class ids"
    if np.isnan(ids).any() or (ids != np.round(ids)).any():
        return f"image_labels {list(labels)} is not a list of class ids"
    ids = ids.astype(np.int64)
    bad = ids[(ids < 0) | (ids >= num_classes)]
    if bad.size:
        return (
            f"image_labels has class ids {sorted(set(bad.tolist()))} outside 0..{num_classes - 1}"
        )
    vector = np.zeros(num_classes - 1, np.float32)
    vector[ids[ids > 0] - 1] = 1.0
    return vector


def decode_weak_batch(
    batch: dict[str, np.ndarray],
    *,
    crop_size: int | tuple[int, int],
    scale_range: tuple[float, float],
    flip: bool,
    ignore_index: int = 255,
    num_classes: int,
    shuffle: bool = False,
    seed: int | tuple[int, ...] | None = None,
    normalized: bool = True,
) -> dict[str, np.ndarray]:
    """Training rows for weakly supervised segmentation: the image-level labels are the target.

    Output columns: `image`, `labels` (B, K-1) float32 multi-hot of the foreground classes (from
    the `image_labels` column), `area` (B, H, W) bool (False on crop padding), `mask` (the row's
    mask when it has a usable one — for diagnostics only, never a training target — else all
    ignore), `background_only` (B,) bool, `valid`, `id`. A row is invalid (all-zero image, logged,
    counted as bad) when its image is undecodable or its `image_labels` is missing or has ids
    outside 0..K-1; a bad optional mask only blanks the diagnostic mask. `shuffle` as in
    `decode_train_batch`; `seed`: see the module docstring.
    """
    rng, batch = _seeded_batch(batch, seed, shuffle)
    ids = [str(i) for i in batch["id"]]
    masks = batch.get("mask")
    labels_column = batch.get("image_labels")
    n, k, (ch, cw) = len(ids), num_classes - 1, crop_hw(crop_size)
    images = np.zeros((n, ch, cw, 3), np.uint8)
    diag = np.full((n, ch, cw), ignore_index, _mask_dtype(normalized))
    area = np.zeros((n, ch, cw), bool)
    labels = np.zeros((n, k), np.float32)
    valid = np.zeros(n, bool)
    for j, row_id in enumerate(ids):
        vector = image_label_vector(
            None if labels_column is None else labels_column[j], num_classes
        )
        if isinstance(vector, str):
            log.warning("skipping row %s: %s", row_id, vector)
            continue
        crop = _crop_with_optional_mask(
            row_id, batch["image"][j], None if masks is None else masks[j], num_classes,
            ignore_index, crop_size, scale_range, flip, rng, "row",
        )  # fmt: skip
        if crop is None:
            continue
        images[j], diag[j], area[j] = crop
        labels[j], valid[j] = vector, True
    return {
        "image": _images_out(images, valid, normalized),
        "labels": labels,
        "area": area,
        "mask": diag,
        "background_only": valid & (labels.sum(1) == 0),
        "id": np.array(ids, dtype=str),
        "valid": valid,
    }


def decode_eval_batch(
    batch: dict[str, np.ndarray],
    *,
    pad_height: int,
    pad_width: int,
    ignore_index: int = 255,
    num_classes: int,
    normalized: bool = True,
) -> dict[str, np.ndarray]:
    """Decode a batch without augmentation, padded bottom/right to pad_height x pad_width.

    Output columns: see the module docstring; H, W = pad_height, pad_width. A row larger than
    the pad size is invalid (logged), not cropped, so no labeled pixel is silently dropped.
    """
    rows = _decode_rows(batch, num_classes, ignore_index)
    out = []
    for row_id, pair in rows:
        if pair is not None:
            try:
                pair = pad_to(pair[0], pair[1], pad_height, pad_width, ignore_index)
            except ValueError as e:
                log.warning("skipping row %s: %s", row_id, e)
                pair = None
        out.append((row_id, pair))
    return _assemble(out, pad_height, pad_width, ignore_index, normalized)


def decode_split(
    root: str, info: DatasetInfo, split: str, rows: int | None = None, normalized: bool = True
) -> dict:
    """The first `rows` (None: all) rows of a split, read in the driver and decoded as for
    evaluation (padded to the split's largest image): `id`, `image`, `mask`, `valid`
    (`normalized`: see decode_eval_batch)."""
    table = read_split_table(root, split, ["id", "image", "mask"])
    if rows is not None:
        table = table.slice(0, rows)
    s = info.splits[split]
    return decode_eval_batch(
        {k: np.array(v, dtype=object) for k, v in table.to_pydict().items()},
        pad_height=s.max_height,
        pad_width=s.max_width,
        ignore_index=info.ignore_index,
        num_classes=info.num_classes,
        normalized=normalized,
    )


__all__ = [
    "check_row",
    "decode_eval_batch",
    "decode_train_batch",
    "decode_unlabeled_batch",
    "decode_weak_batch",
    "image_label_vector",
]
