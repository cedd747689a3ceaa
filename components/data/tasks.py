"""The functions Ray Data's tasks call (the `map_batches` callables of data/ingest.py).

A task's worker process imports the module of every function it unpickles. These live apart
from ingest.py, which imports Ray Train (and with it torch) for its `DataConfig`: importing
ingest cost a decode worker (and the split coordinator) about 2 s and 300 MB on the first task
of a run; this module needs only numpy, pyarrow, Ray Data's context and the torch-free decoders
(measured with `python -X importtime`, 2026-12-01: 0.3 s and 86 MB for components.data.decode).
tests/data/test_ingest.py checks that importing this module imports no torch.

Importing it also shortens Ray Data's cold start of each execution in the importing process
(`ray_limits.shorten_cold_start`): every process that runs an executor of our datasets (the
driver iterating one, the split coordinator feeding a run) unpickles functions from here.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from ray.data.context import DataContext

from components.data.ray_limits import shorten_cold_start
from components.data.shards import read_shard_table

shorten_cold_start()


def read_shards(batch: pa.Table, root: str, split: str, columns: list[str]) -> pa.Table:
    """The rows of the shards named in `batch` (one per row of its `shard` column)."""
    return pa.concat_tables(
        read_shard_table(root, split, shard, columns) for shard in batch.column("shard").to_pylist()
    )


def seeded_by_epoch(batch: dict[str, np.ndarray], decode, seed: int) -> dict[str, np.ndarray]:
    """`decode(batch)` seeded by (seed, the epoch, the batch's ids): reproducible, and new each
    epoch. The epoch is the dataset's execution index as the task sees it in its DataContext:
    the counter Ray Data's own per-execution reseeding reads (`RandomSeedConfig`,
    `expressions.random`: ray/data/_internal/planner/plan_expression/synthetic_impl.py), raised
    after each finished execution (execution_idx_update_callback.py)."""
    epoch = getattr(DataContext.get_current(), "_execution_idx", 0)
    return decode(batch, seed=(seed, epoch))


def select_rows(batch: dict[str, np.ndarray], ids: frozenset[str], keep: bool) -> dict:
    """The rows whose id is (keep=True) or is not (keep=False) in `ids`."""
    chosen = np.array([(str(i) in ids) == keep for i in batch["id"]], dtype=bool)
    return {k: v[chosen] for k, v in batch.items()}


__all__ = ["read_shards", "seeded_by_epoch", "select_rows"]
