"""Ray Data pipelines: parquet shards -> decode + augment on CPU tasks -> Ray Train workers.

    datasets = build_datasets(cfg.data, info)       # {"train": Dataset, "val": Dataset}
    TorchTrainer(..., datasets=datasets, dataset_config=SegDataConfig())

Train rows are read with a per-epoch file shuffle (`FileShuffleConfig(seed,
reseed_after_execution=True)`: a different but deterministic file order each epoch), shuffled
again inside each decode batch, decoded and augmented in `map_batches`, then split evenly across
workers (`streaming_split(equal=True)`, so every worker runs the same number of steps). The
validation split is split *unevenly* (`equal=False`): no row is dropped, and each worker's
confusion matrix is summed with an all-reduce, so the metric covers the whole split exactly.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import ray
import ray.data
from ray.data import FileShuffleConfig

from components.config import DataConfig
from components.data.shards import DatasetInfo, list_shards
from components.data.transforms import decode_eval_batch, decode_train_batch

READ_COLUMNS = ["id", "image", "mask"]
# Rows decoded per Ray Data task call; also the window of the in-batch row shuffle.
DECODE_BATCH_ROWS = 32


def _shuffle_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    order = np.random.default_rng().permutation(len(batch["id"]))
    return {k: v[order] for k, v in batch.items()}


def _decode_train(batch: dict[str, np.ndarray], **kwargs) -> dict[str, np.ndarray]:
    return decode_train_batch(_shuffle_rows(batch), **kwargs)


def train_dataset(
    data: DataConfig, info: DatasetInfo, split: str | None = None
) -> ray.data.Dataset:
    split = split or data.train_split
    ds = ray.data.read_parquet(
        list_shards(data.root, split),
        columns=READ_COLUMNS,
        shuffle=FileShuffleConfig(seed=data.shuffle_seed, reseed_after_execution=True),
    )
    decode = partial(
        _decode_train,
        crop_size=data.crop_size,
        scale_range=(data.scale_min, data.scale_max),
        flip=data.flip,
        seed=None,
        ignore_index=info.ignore_index,
        num_classes=info.num_classes,
    )
    return ds.map_batches(decode, batch_size=DECODE_BATCH_ROWS, batch_format="numpy").drop_columns(
        ["id"]
    )


def eval_dataset(root: str, info: DatasetInfo, split: str) -> ray.data.Dataset:
    """Decoded rows padded to the split's largest image (padding is ignore in the mask)."""
    if split not in info.splits:
        raise ValueError(f"{root}/dataset.json has no split '{split}' (has {sorted(info.splits)})")
    s = info.splits[split]
    pad_h, pad_w = -(-s.max_height // 8) * 8, -(-s.max_width // 8) * 8
    ds = ray.data.read_parquet(list_shards(root, split), columns=READ_COLUMNS)
    decode = partial(
        decode_eval_batch,
        pad_height=pad_h,
        pad_width=pad_w,
        ignore_index=info.ignore_index,
        num_classes=info.num_classes,
    )
    return ds.map_batches(decode, batch_size=DECODE_BATCH_ROWS, batch_format="numpy").drop_columns(
        ["id"]
    )


def build_datasets(data: DataConfig, info: DatasetInfo) -> dict[str, ray.data.Dataset]:
    return {
        "train": train_dataset(data, info),
        "val": eval_dataset(data.root, info, data.val_split),
    }


class SegDataConfig(ray.train.DataConfig):
    """Split `train` evenly (equal step counts for DDP) and evaluation datasets unevenly."""

    def __init__(self, uneven: tuple[str, ...] = ("val",), **kwargs):
        super().__init__(**kwargs)
        self._uneven = set(uneven)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        even = {k: v for k, v in datasets.items() if k not in self._uneven}
        if even:
            parts = super().configure(even, world_size, worker_handles, worker_node_ids, **kwargs)
            for rank in range(world_size):
                output[rank].update(parts[rank])
        for name, ds in datasets.items():
            if name not in self._uneven:
                continue
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            for rank, split in enumerate(ds.streaming_split(world_size, equal=False)):
                output[rank][name] = split
        return output


def steps_per_epoch(info: DatasetInfo, split: str, batch_size: int, num_workers: int) -> int:
    """Full batches each worker gets from an even split; raises when the split is too small."""
    rows = info.splits[split].rows
    steps = (rows // num_workers) // batch_size
    if steps < 1:
        raise ValueError(
            f"split '{split}' has {rows} rows: too few for {num_workers} worker(s) x batch "
            f"{batch_size} (need at least {num_workers * batch_size})"
        )
    return steps
