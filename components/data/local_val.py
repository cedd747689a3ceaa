"""Evaluation rows decoded once, in each training worker's memory, instead of through Ray Data.

    if val_in_workers(cfg.data, info, num_workers):      # the driver decides, before fit
        local = LocalVal(root, info, "val", rank, world)  # a worker, at its first evaluation
        for batch in local.batches(8, device): ...        # every evaluation after that

Evaluation has no randomness, so decoding the val split anew every epoch (Ray Data's read,
decode and split, 3-7x a plain loop's evaluation on a 64-image split: issue 24) buys nothing
when a worker's share fits in memory. Each worker keeps rows rank, rank + world, ... of the
split (shards read one at a time, page checksums verified as on every path), decoded as
`decode_eval_batch` decodes them (uint8, padded to the split's largest image rounded up to 8,
bad rows invalid and logged); the confusion matrices are summed across workers as before, so
the whole split is counted exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from components.data.decode import decode_eval_batch
from components.data.shards import DatasetInfo, iter_shard_tables
from components.schema import DataConfig

# A worker's decoded share (images + masks, uint8) above this streams through Ray Data instead.
VAL_IN_WORKER_BYTES = 256 * 2**20


def eval_pad(info: DatasetInfo, split: str) -> tuple[int, int]:
    """The padded (height, width) of a split's evaluation rows: its largest image, rounded up
    to a multiple of 8."""
    s = info.splits[split]
    return -(-s.max_height // 8) * 8, -(-s.max_width // 8) * 8


def val_in_workers(data: DataConfig, info: DatasetInfo, num_workers: int) -> bool:
    """`data.val_in_workers`, where None means: when a worker's share decodes to at most
    VAL_IN_WORKER_BYTES."""
    if data.val_in_workers is not None:
        return data.val_in_workers
    height, width = eval_pad(info, data.val_split)
    share = -(-info.splits[data.val_split].rows // max(1, num_workers))
    return share * height * width * 4 <= VAL_IN_WORKER_BYTES


def local_root(root: str) -> str:
    """A dataset root the workers can open whatever their working directory: absolute, or the
    URI as it is."""
    return root if "://" in root else str(Path(root).resolve())


class LocalVal:
    """This worker's share of a split, decoded once (uint8 images (N, H, W, 3), masks (N, H, W),
    `valid`)."""

    def __init__(self, root: str, info: DatasetInfo, split: str, rank: int, world: int):
        height, width = eval_pad(info, split)
        parts, seen = [], 0
        for _, table in iter_shard_tables(root, split, ["id", "image", "mask"]):
            mine = [k for k in range(table.num_rows) if (seen + k) % world == rank]
            seen += table.num_rows
            if not mine:
                continue
            rows = table.take(mine).to_pydict()
            parts.append(
                decode_eval_batch(
                    {k: np.array(v, dtype=object) for k, v in rows.items()},
                    pad_height=height,
                    pad_width=width,
                    ignore_index=info.ignore_index,
                    num_classes=info.num_classes,
                    normalized=False,
                )
            )
        self.columns = {
            key: (
                np.concatenate([p[key] for p in parts]) if parts else np.zeros((0, *shape), dtype)
            )
            for key, shape, dtype in (
                ("image", (height, width, 3), np.uint8),
                ("mask", (height, width), np.uint8),
                ("valid", (), bool),
            )
        }

    def __len__(self) -> int:
        return len(self.columns["valid"])

    def batches(self, batch_size: int, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of `batch_size` rows (the last one shorter) on `device`, as Ray Data's
        `iter_torch_batches` would give them (uint8; `data/device.model_batch` normalises)."""
        for start in range(0, len(self), batch_size):
            yield {
                key: torch.from_numpy(column[start : start + batch_size]).to(device)
                for key, column in self.columns.items()
            }


__all__ = ["VAL_IN_WORKER_BYTES", "LocalVal", "eval_pad", "local_root", "val_in_workers"]
