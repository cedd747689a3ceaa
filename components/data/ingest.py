"""Ray Data pipelines: parquet shards -> decode + augment on CPU tasks -> Ray Train workers.

    datasets = build_datasets(cfg.data, info)       # {"train": Dataset, "val": Dataset}
    TorchTrainer(..., datasets=datasets, dataset_config=SegDataConfig())

Rows are read as encoded bytes (PNG/JPEG), decoded and augmented in `map_batches` tasks, then
split across workers. Each epoch is one execution of the pipeline. Decoded rows travel as uint8
(images (B, H, W, 3), masks (B, H, W)); the worker normalises them on its device
(`components.data.device.model_batch`).

- **Encoded-row cache.** When a split's shards are small next to the object store
  (`data.cache_encoded`, default: auto, under 20% of it), the driver reads the encoded rows once
  (pyarrow, one block per shard) into the object store; every epoch then only re-runs decode +
  augment. Re-listing and re-reading the files each epoch costs tens of seconds on a small
  machine, which the cache removes; large datasets are streamed from storage every epoch, one
  read task per shard.
- **Integrity.** Both paths read with the shards' parquet page checksums verified
  (`shards.read_shard_table`): a corrupted image or mask page makes its rows bad rows (counted
  against `data.max_bad_fraction`), any other corruption fails naming the shard.
- **Shuffle.** A different, deterministic shard (block) order each epoch
  (`RandomSeedConfig(seed, reseed_after_execution=True)`). Rows are also permuted inside each
  decode batch. Ray's local shuffle buffer is not used (slow, and it breaks DDP step parity).
- **Reproducible.** The in-batch permutation and the augmentation are seeded by
  (`data.shuffle_seed`, the epoch's execution index, the batch's ids) (`tasks.seeded_by_epoch`), and
  the executions keep the block order (`preserve_order`, `SegDataConfig`): the same command
  with the same seeds gives the same batches, epoch after epoch, on one worker. With several
  workers, which worker gets which block is decided at run time (Ray's `streaming_split`). A
  resumed run's datasets count on from the checkpoint's epoch (`trainer._continue_epochs`).
- **Splits.** `train` is split evenly (`streaming_split(equal=True)`: every worker runs the same
  number of steps). Validation is split *unevenly* (`equal=False`): no row is dropped, and the
  workers' confusion matrices are summed, so the metric covers the whole split exactly.
"""

from __future__ import annotations

from functools import partial

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from ray.data import RandomSeedConfig
from ray.train import DataConfig as RayDataConfig

from components.data.local_val import eval_pad
from components.data.semisup_plan import SemiSupPlan, plan_semisup, semisup_steps
from components.data.shards import (
    DatasetInfo,
    list_shards,
    read_shard_tables,
    resolve_fs,
)
from components.data.tasks import read_shards, seeded_by_epoch, select_rows
from components.data.transforms import (
    decode_eval_batch,
    decode_train_batch,
    decode_unlabeled_batch,
    decode_weak_batch,
)
from components.schema import DataConfig, SemiSupConfig

READ_COLUMNS = ["id", "image", "mask"]
# A selected subset (`data.labeled_count`) is repeated as rows in the object store up to this
# size an epoch; beyond it, as the same blocks again (a union).
REPEAT_IN_DRIVER_BYTES = 64 * 2**20
# Rows decoded per Ray Data task call; also the window of the in-batch row shuffle.
DECODE_BATCH_ROWS = 32
# Large images: fewer rows per decode call and per cached block, so a split's decoding spreads
# over many short tasks (a 128-row shard of 512x1024 photos was one 12 s task): 8 rows of
# 512x1024, 2 of 1024x2048. Measured (benchmarks/ingest_vs_dataloader.py's photos, cached):
# 8 rows a block 38 img/s, 2 rows 31; small images keep whole shards as blocks (32-row blocks of
# 48 px images: 780-970 img/s against 1440-1880).
DECODE_BATCH_PIXELS = 8 * 512 * 1024
# Cached large images: a decode call (one task) takes several of those blocks, about a second
# of one core's decoding: 48 rows of 512x1024, 12 of 1024x2048. Tasks of one 8-row block lost a
# share of every epoch to the gaps between tasks: benchmarks/ingest_vs_dataloader.py's photos,
# cached, 8-row blocks, decode calls of 8 / 16 / 24 / 48 rows: 47 / 55 / 61 / 67 img/s
# (DataLoader 69; 2026-12-01, docs/benchmarks.md). The blocks stay small, so the per-epoch
# block shuffle still mixes them, and the in-batch permutation spans the whole call.
CACHED_DECODE_PIXELS = 6 * DECODE_BATCH_PIXELS
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


def decode_rows(info: DatasetInfo, split: str, cached: bool = False) -> int:
    """Rows per decode call (and per cached block) for a split: DECODE_BATCH_ROWS, fewer for
    large images (at least 2). `cached`: rows per decode call on the cached path, where large
    images' calls take several blocks (CACHED_DECODE_PIXELS)."""
    s = info.splits.get(split)
    pixels = max(1, s.max_height * s.max_width) if s is not None else 1
    rows = max(2, min(DECODE_BATCH_ROWS, DECODE_BATCH_PIXELS // pixels))
    if cached and rows < DECODE_BATCH_ROWS:
        return max(rows, CACHED_DECODE_PIXELS // pixels)
    return rows


def _encoded_rows(
    root: str,
    split: str,
    seed: int | None,
    cache: bool,
    columns: list[str] = READ_COLUMNS,
    block_rows: int = DECODE_BATCH_ROWS,
    chosen: tuple[frozenset[str], bool, int] | None = None,
) -> ray.data.Dataset:
    """Encoded rows, one block per shard (or per `block_rows` rows for large images), in a
    seeded block order that changes each epoch. `chosen` = (ids, keep, passes), cached path
    only: the rows whose id is (keep) or is not (not keep) in `ids`, selected here, `passes`
    times over, in blocks of a shard's rows (`block_rows` for large images)."""
    if cache:
        # Read here, straight into the object store: no read tasks to schedule (a
        # `read_parquet(...).materialize()` costs a minute of worker start-ups on a small
        # machine for a few kB of rows). One block per shard, or per `block_rows` rows when that is
        # below DECODE_BATCH_ROWS (large images): one decode task each.
        tables = read_shard_tables(root, split, columns)
        passes = 1  # the blocks' passes an epoch, as a union
        if chosen is not None:
            # A labeled subset (`data.labeled_count`) is selected once here, not by a task per
            # shard and pass: 16 rows of 512 repeated 31 times an epoch made 31 select + 31
            # decode tasks of a few rows each (docs/benchmarks.md, issue 24).
            ids, keep, passes = chosen
            picked = [
                t.filter(pc.equal(pc.is_in(t["id"], pa.array(sorted(ids), t["id"].type)), keep))
                for t in tables
            ]
            # Repeated here, as rows, while the copies are small (each is stored in the object
            # store); larger selections repeat as the same blocks (a union) instead.
            if passes * sum(t.nbytes for t in picked) <= REPEAT_IN_DRIVER_BYTES:
                picked, passes = picked * passes, 1
            whole = pa.concat_tables(picked)
            # blocks as large as a shard, as without a selection (small images decode faster
            # in few large tasks), or `block_rows` for large images
            size = block_rows if block_rows < DECODE_BATCH_ROWS else max(map(len, tables))
            tables = [whole.slice(i, size) for i in range(0, len(whole), size)] or [whole]
        elif block_rows < DECODE_BATCH_ROWS:  # large images: short decode tasks
            tables = [t.slice(i, block_rows) for t in tables for i in range(0, len(t), block_rows)]
        ds = _repeat(ray.data.from_arrow(tables), passes)
        if seed is not None:
            ds = ds.randomize_block_order(
                seed=RandomSeedConfig(seed=seed, reseed_after_execution=True)
            )
        return ds
    # One read task per shard, its page checksums verified (read_shard_table: a corrupted
    # image/mask page makes bad rows, anything else fails naming the shard). Ray Data's
    # read_parquet in Ray 2.60 ignores pyarrow's page_checksum_verification, and where it can be
    # made to honour it a bad page fails the whole read task.
    shards = list_shards(root, split)
    ds = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
    if seed is not None:
        ds = ds.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    read = partial(read_shards, root=root, split=split, columns=columns)
    return ds.map_batches(read, batch_size=1, batch_format="pyarrow")


def _augmenting(decoder, data: DataConfig, info: DatasetInfo, **extra):
    """A training decoder with the config's crop, scale range and flip; rows are permuted
    inside each decode batch; both seeded per epoch (`tasks.seeded_by_epoch`)."""
    decode = partial(
        decoder,
        crop_size=data.crop_size,
        scale_range=(data.scale_min, data.scale_max),
        flip=data.flip,
        ignore_index=info.ignore_index,
        num_classes=info.num_classes,
        shuffle=True,
        normalized=False,  # uint8 rows; normalised on the worker's device (data/device.py)
        **extra,
    )
    return partial(seeded_by_epoch, decode=decode, seed=data.shuffle_seed)


def _decoded(ds: ray.data.Dataset, decode, rows: int = DECODE_BATCH_ROWS) -> ray.data.Dataset:
    return ds.map_batches(decode, batch_size=rows, batch_format="numpy").drop_columns(["id"])


def train_dataset(
    data: DataConfig,
    info: DatasetInfo,
    split: str | None = None,
    keep_ids: frozenset[str] | None = None,
    repeat: int = 1,
    weak: bool = False,
) -> ray.data.Dataset:
    """Decoded, augmented training rows; `keep_ids` selects rows, `repeat` passes per epoch.
    `weak`: crops with their image-level labels (the `image_labels` column), `area` and a
    diagnostic-only mask (`decode_weak_batch`), for weakly supervised runs."""
    split = split or data.train_split
    cache = should_cache(data, shard_bytes(data.root, split))
    columns = [*READ_COLUMNS, "image_labels"] if weak else READ_COLUMNS
    rows, call = decode_rows(info, split), decode_rows(info, split, cache)
    decoder = _augmenting(decode_weak_batch if weak else decode_train_batch, data, info)
    if keep_ids is not None and cache:  # selected and repeated once, in the driver
        chosen = (keep_ids, True, repeat)
        ds = _encoded_rows(data.root, split, data.shuffle_seed, cache, columns, rows, chosen)
        return _decoded(ds, decoder, call)
    ds = _encoded_rows(data.root, split, data.shuffle_seed, cache, columns, rows)
    if keep_ids is not None:
        ds = ds.map_batches(partial(select_rows, ids=keep_ids, keep=True), batch_format="numpy")
    return _decoded(_repeat(ds, repeat), decoder, call)


def _repeat(ds: ray.data.Dataset, times: int) -> ray.data.Dataset:
    return ds if times <= 1 else ds.union(*([ds] * (times - 1)))


def eval_dataset(
    root: str, info: DatasetInfo, split: str, cache: bool | None = None
) -> ray.data.Dataset:
    """Decoded rows padded to the split's largest image (padding is ignore in the mask)."""
    if split not in info.splits:
        raise ValueError(f"{root}/dataset.json has no split '{split}' (has {sorted(info.splits)})")
    pad_h, pad_w = eval_pad(info, split)
    if cache is None:
        cache = should_cache(DataConfig(cache_encoded=None), shard_bytes(root, split))
    decode = partial(
        decode_eval_batch,
        pad_height=pad_h,
        pad_width=pad_w,
        ignore_index=info.ignore_index,
        num_classes=info.num_classes,
        normalized=False,
    )
    ds = _encoded_rows(root, split, None, cache, block_rows=decode_rows(info, split))
    return _decoded(ds, decode, decode_rows(info, split, cache))


def build_datasets(
    data: DataConfig, info: DatasetInfo, keep_ids: frozenset[str] | None = None, weak: bool = False
) -> dict[str, ray.data.Dataset]:
    """{"train", "val"}: `train_dataset` (repeated `data.train_repeat` times) and the val split."""
    val_cache = should_cache(data, shard_bytes(data.root, data.val_split))
    return {
        "train": train_dataset(data, info, keep_ids=keep_ids, repeat=data.train_repeat, weak=weak),
        "val": eval_dataset(data.root, info, data.val_split, cache=val_cache),
    }


# ----------------------------------------------------------------------------------------------
# Semi-supervised: a labeled and an unlabeled stream (planned in data/semisup_plan.py)


def unlabeled_dataset(
    data: DataConfig,
    info: DatasetInfo,
    plan: SemiSupPlan,
    semisup: SemiSupConfig,
    repeat: int = 1,
) -> ray.data.Dataset:
    """Weak + strong views of the unlabeled split and of the labeled split's unchosen rows."""
    parts, calls = [], []  # the parts and their rows per decode call
    if plan.has_unlabeled_split:
        split = data.unlabeled_split
        cache = should_cache(data, shard_bytes(data.root, split))
        rows = decode_rows(info, split)
        calls.append(decode_rows(info, split, cache))
        parts.append(_encoded_rows(data.root, split, data.shuffle_seed + 1, cache, block_rows=rows))
    if plan.labeled_ids is not None:
        cache = should_cache(data, shard_bytes(data.root, data.train_split))
        rows = decode_rows(info, data.train_split)
        calls.append(decode_rows(info, data.train_split, cache))
        seed = data.shuffle_seed + 2
        if cache:  # the unchosen rows, selected once in the driver
            chosen = (plan.labeled_ids, False, 1)
            split = data.train_split
            parts.append(
                _encoded_rows(data.root, split, seed, cache, block_rows=rows, chosen=chosen)
            )
        else:
            rest = _encoded_rows(data.root, data.train_split, seed, cache, block_rows=rows)
            select = partial(select_rows, ids=plan.labeled_ids, keep=False)
            parts.append(rest.map_batches(select, batch_format="numpy"))
    ds = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
    decode = _augmenting(decode_unlabeled_batch, data, info, strong=tuple(semisup.strong))
    return _decoded(_repeat(ds, repeat), decode, min(calls))


def build_semisup_datasets(
    data: DataConfig, info: DatasetInfo, semisup: SemiSupConfig, num_workers: int
) -> tuple[dict[str, ray.data.Dataset], int, SemiSupPlan]:
    """{"train", "unlabeled", "val"} datasets and the steps per epoch."""
    plan = plan_semisup(data, info)
    steps, labeled_passes, unlabeled_passes = semisup_steps(plan, data, num_workers)
    val_cache = should_cache(data, shard_bytes(data.root, data.val_split))
    datasets = {
        "train": train_dataset(data, info, keep_ids=plan.labeled_ids, repeat=labeled_passes),
        "unlabeled": unlabeled_dataset(data, info, plan, semisup, repeat=unlabeled_passes),
        "val": eval_dataset(data.root, info, data.val_split, cache=val_cache),
    }
    return datasets, steps, plan


class SegDataConfig(RayDataConfig):
    """Split `train` evenly (equal step counts for DDP) and evaluation datasets unevenly."""

    def __init__(self, uneven: tuple[str, ...] = ("val",), **kwargs):
        super().__init__(**kwargs)
        self._uneven = set(uneven)

    def default_ingest_options(self):
        """Ray Train's defaults (carried from the driver's DataContext) with the executions'
        output kept in the block order: without it, blocks reach a worker as their decode
        tasks finish, and the same seeds give another batch order from run to run."""
        options = RayDataConfig.default_ingest_options()
        options.preserve_order = True
        return options

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


def driver_datasets(datasets: dict, training_cpus: float) -> dict:
    """The datasets of a run in the driver (Ray Train's local mode, which hands the training
    function the datasets as given): split for one consumer as a worker's are
    (`SegDataConfig.configure`), so each epoch's execution runs in its split coordinator's
    process rather than in threads of the training process (measured: steps with a long tail
    otherwise), with the CPUs the training uses kept from Ray Data (in worker mode they are the
    worker actor's reservation, which Ray Data does not schedule on). The CPUs are kept as a
    limit on Ray Data's CPUs (the instance's less the training's: local mode runs on one
    machine's own instance), not with `exclude_resources`, which Ray 2.60 deprecates."""
    options = SegDataConfig().default_ingest_options()
    cpus = max(0.0, ray.cluster_resources().get("CPU", 0.0) - training_cpus)
    options.resource_limits = options.resource_limits.copy(cpu=cpus)
    config = SegDataConfig(execution_options=options)
    return config.configure(datasets, world_size=1, worker_handles=None, worker_node_ids=None)[0]


def steps_per_epoch(
    info: DatasetInfo, split: str, batch_size: int, num_workers: int, rows: int | None = None
) -> int:
    """Full batches each worker gets from an even split (of `rows` rows when only part of it is
    used); raises when the split is too small."""
    rows = info.splits[split].rows if rows is None else rows
    steps = (rows // num_workers) // batch_size
    if steps < 1:
        raise ValueError(
            f"split '{split}' has {rows} rows: too few for {num_workers} worker(s) x batch "
            f"{batch_size} (need at least {num_workers * batch_size})"
        )
    return steps
