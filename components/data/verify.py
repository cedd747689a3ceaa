"""Re-read a converted dataset and check it (`prepare_data.py verify` / `--verify`)."""

from __future__ import annotations

import os

import pyarrow as pa

from components.data.shards import (
    SHARD_SCHEMA,
    DatasetError,
    DatasetInfo,
    decode_image,
    decode_mask,
    list_shards,
    mask_labels,
    read_shard_table,
)


def verify(root: str, log=print) -> list[str]:
    """Re-read a converted dataset; returns the problems found (empty: all good).

    Checks dataset.json, that each split's shards hold the recorded row count, that every image
    and mask decodes with the recorded size, and that mask ids are in [0, num_classes) or the
    ignore index, and image_labels agree with the mask. Shards are read with their page
    checksums verified and images with their PNG CRCs, so corrupted bytes are reported (a shard
    that cannot be read at all is one problem; the other shards are still checked)."""
    problems: list[str] = []
    info = DatasetInfo.load(root)
    for split, s in info.splits.items():
        shards = list_shards(root, split)
        names = sorted(os.path.basename(p) for p in shards)
        if names != sorted(s.shards):
            problems.append(f"{split}: shards on disk {names} differ from dataset.json {s.shards}")
        tables = []
        for shard in shards:
            try:
                tables.append(read_shard_table(root, split, shard, problems=problems))
            except DatasetError as e:
                problems.append(str(e))
        table = pa.concat_tables(tables) if tables else SHARD_SCHEMA.empty_table()
        if table.num_rows != s.rows:
            problems.append(f"{split}: {table.num_rows} rows, dataset.json says {s.rows}")
        allowed = set(range(info.num_classes)) | {info.ignore_index}
        for row in table.to_pylist():
            where = f"{split}/{row['id']}"
            try:
                image = decode_image(row["image"])
            except ValueError as e:
                problems.append(f"{where}: image: {e}")
                continue
            if image.shape[:2] != (row["height"], row["width"]):
                problems.append(f"{where}: image is {image.shape[:2]}, row says "
                                f"{row['height']}x{row['width']}")  # fmt: skip
            if row["mask"] is None:
                continue
            try:
                mask = decode_mask(row["mask"])
            except ValueError as e:
                problems.append(f"{where}: mask: {e}")
                continue
            if mask.shape != image.shape[:2]:
                problems.append(f"{where}: mask {mask.shape} differs from image {image.shape[:2]}")
            present = set(mask_labels(mask, info.ignore_index))
            if present - allowed:
                problems.append(f"{where}: mask ids {sorted(present - allowed)} out of range")
            if sorted(present) != list(row["image_labels"]):
                problems.append(f"{where}: image_labels {row['image_labels']} but mask has "
                                f"{sorted(present)}")  # fmt: skip
        log(f"{split}: {table.num_rows} rows checked")
    return problems


__all__ = ["verify"]
