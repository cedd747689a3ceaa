"""Ray Data pipelines: parquet shards -> decode + augment on CPU tasks -> Ray Train workers.

    datasets = build_datasets(cfg.data, info)       # {"train": Dataset, "val": Dataset}
    TorchTrainer(..., datasets=datasets, dataset_config=SegDataConfig())

Rows are read as encoded bytes (PNG/JPEG), decoded and augmented in `map_batches` tasks, then
split across workers. Each epoch is one execution of the pipeline.

- **Encoded-row cache.** When a split's shards are small next to the object store
  (`data.cache_encoded`, default: auto, under 20% of it), the driver reads the encoded rows once
  (pyarrow, one block per shard) into the object store; every epoch then only re-runs decode +
  augment. Re-listing and re-reading the files each epoch costs tens of seconds on a small
  machine, which the cache removes; large datasets are streamed from storage every epoch.
- **Shuffle.** Streamed: a different, deterministic file order each epoch
  (`FileShuffleConfig(seed, reseed_after_execution=True)`); cached: the block order is
  re-randomised each epoch the same way (`RandomSeedConfig`). Rows are also permuted inside each
  decode batch. Ray's local shuffle buffer is not used (slow, and it breaks DDP step parity).
- **Splits.** `train` is split evenly (`streaming_split(equal=True)`: every worker runs the same
  number of steps). Validation is split *unevenly* (`equal=False`): no row is dropped, and the
  workers' confusion matrices are summed, so the metric covers the whole split exactly.
"""

from __future__ import annotations

from functools import partial

import ray
import ray.data
from ray.data import FileShuffleConfig, RandomSeedConfig
from ray.train import DataConfig as RayDataConfig

from components.config import DataConfig
from components.data.shards import DatasetInfo, list_shards, read_shard_tables, resolve_fs
from components.data.transforms import decode_eval_batch, decode_train_batch

READ_COLUMNS = ["id", "image", "mask"]
# Rows decoded per Ray Data task call; also the window of the in-batch row shuffle.
DECODE_BATCH_ROWS = 32
# Auto-cache encoded rows when they take less than this share of the object store.
CACHE_SHARE = 0.2


def shard_bytes(root: str, split: str) -> int:
    fs, _ = resolve_fs(root)
    paths = [p.split("://", 1)[-1] for p in list_shards(root, split)]
    return sum(info.size or 0 for info in fs.get_file_info(paths))


def should_cache(data: DataConfig, split_bytes: int) -> bool:
    if data.cache_encoded is not None:
        return data.cache_encoded
    store = ray.cluster_resources().get("object_store_memory", 0)
    return split_bytes < CACHE_SHARE * store


def _encoded_rows(root: str, split: str, seed: int | None, cache: bool) -> ray.data.Dataset:
    if cache:
        # Read here, one block per shard, straight into the object store: no read tasks to
        # schedule (a `read_parquet(...).materialize()` costs a minute of worker start-ups on a
        # small machine for a few kB of rows).
        ds = ray.data.from_arrow(read_shard_tables(root, split, READ_COLUMNS))
        if seed is not None:
            ds = ds.randomize_block_order(
                seed=RandomSeedConfig(seed=seed, reseed_after_execution=True)
            )
        return ds
    shuffle = None
    if seed is not None:
        shuffle = FileShuffleConfig(seed=seed, reseed_after_execution=True)
    return ray.data.read_parquet(list_shards(root, split), shuffle=shuffle).select_columns(
        READ_COLUMNS
    )


def train_dataset(
    data: DataConfig, info: DatasetInfo, split: str | None = None
) -> ray.data.Dataset:
    split = split or data.train_split
    cache = should_cache(data, shard_bytes(data.root, split))
    decode = partial(
        decode_train_batch,
        crop_size=data.crop_size,
        scale_range=(data.scale_min, data.scale_max),
        flip=data.flip,
        seed=None,
        ignore_index=info.ignore_index,
        num_classes=info.num_classes,
        shuffle=True,
    )
    ds = _encoded_rows(data.root, split, data.shuffle_seed, cache)
    return ds.map_batches(decode, batch_size=DECODE_BATCH_ROWS, batch_format="numpy").drop_columns(
        ["id"]
    )


def eval_dataset(
    root: str, info: DatasetInfo, split: str, cache: bool | None = None
) -> ray.data.Dataset:
    """Decoded rows padded to the split's largest image (padding is ignore in the mask)."""
    if split not in info.splits:
        raise ValueError(f"{root}/dataset.json has no split '{split}' (has {sorted(info.splits)})")
    s = info.splits[split]
    pad_h, pad_w = -(-s.max_height // 8) * 8, -(-s.max_width // 8) * 8
    if cache is None:
        cache = should_cache(DataConfig(cache_encoded=None), shard_bytes(root, split))
    decode = partial(
        decode_eval_batch,
        pad_height=pad_h,
        pad_width=pad_w,
        ignore_index=info.ignore_index,
        num_classes=info.num_classes,
    )
    ds = _encoded_rows(root, split, None, cache)
    return ds.map_batches(decode, batch_size=DECODE_BATCH_ROWS, batch_format="numpy").drop_columns(
        ["id"]
    )


def build_datasets(data: DataConfig, info: DatasetInfo) -> dict[str, ray.data.Dataset]:
    val_cache = should_cache(data, shard_bytes(data.root, data.val_split))
    return {
        "train": train_dataset(data, info),
        "val": eval_dataset(data.root, info, data.val_split, cache=val_cache),
    }


class SegDataConfig(RayDataConfig):
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
