"""Which rows a run uses: the labeled subset of a split (`data.labeled_count`) and, for a
semi-supervised run, the sizes of its labeled and unlabeled streams and the steps of an epoch.

Planning only (no Ray): `components/data/ingest.py` builds the datasets from these plans
(`train_dataset(keep_ids=...)`, `unlabeled_dataset`, `build_semisup_datasets`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from components.data.shards import DatasetError, DatasetInfo, read_split_table
from components.schema import DataConfig


@dataclass
class SemiSupPlan:
    """Where the labeled and unlabeled rows come from, and how many of each there are."""

    labeled_rows: int
    unlabeled_rows: int
    labeled_ids: frozenset[str] | None  # None: all of the labeled split
    has_unlabeled_split: bool

    def describe(self, data: DataConfig) -> str:
        parts = []
        if self.has_unlabeled_split:
            parts.append(f"'{data.unlabeled_split}'")
        if self.labeled_ids is not None:
            parts.append(f"the rest of '{data.train_split}'")
        return (
            f"{self.labeled_rows} labeled rows ('{data.train_split}'), {self.unlabeled_rows} "
            f"unlabeled rows ({' + '.join(parts)})"
        )


def labeled_selection(data: DataConfig, info: DatasetInfo) -> tuple[frozenset[str] | None, int]:
    """(ids of the labeled rows to use or None for all, their count) from `data.labeled_count`:
    a seeded (`data.shuffle_seed`) random choice, the same for every run of that seed."""
    rows = info.splits[data.train_split].rows
    count = data.labeled_count
    if count is None or count == rows:
        return None, rows
    if count > rows:
        raise DatasetError(
            f"data.labeled_count={count} but {data.root} split '{data.train_split}' has only "
            f"{rows} rows"
        )
    all_ids = read_split_table(data.root, data.train_split, ["id"]).column("id").to_pylist()
    chosen = np.random.default_rng(data.shuffle_seed).choice(len(all_ids), count, replace=False)
    return frozenset(all_ids[i] for i in chosen.tolist()), count


def plan_semisup(data: DataConfig, info: DatasetInfo) -> SemiSupPlan:
    """Check the splits and pick the labeled subset; raises DatasetError naming the numbers."""
    root = data.root
    if data.train_split not in info.splits:
        raise DatasetError(
            f"{root}/dataset.json has no labeled split '{data.train_split}' "
            f"(has {sorted(info.splits)})"
        )
    rows = info.splits[data.train_split].rows
    if rows == 0:
        raise DatasetError(f"{root}: the labeled split '{data.train_split}' is empty (0 rows)")
    count = data.labeled_count
    ids, labeled = labeled_selection(data, info)  # raises when count > rows
    has_unlabeled = (
        data.unlabeled_split in info.splits and info.splits[data.unlabeled_split].rows > 0
    )
    unlabeled = (info.splits[data.unlabeled_split].rows if has_unlabeled else 0) + rows - labeled
    if unlabeled == 0:
        raise DatasetError(
            f"no unlabeled images: {root}/dataset.json has no non-empty split "
            f"'{data.unlabeled_split}' (has {sorted(info.splits)}) and data.labeled_count "
            f"({count}) leaves none of the {rows} '{data.train_split}' rows over; make one with "
            "pipelines/prepare_data.py --labeled N, or set data.labeled_count below "
            f"{rows}"
        )
    return SemiSupPlan(labeled, unlabeled, ids, has_unlabeled)


def semisup_steps(plan: SemiSupPlan, data: DataConfig, num_workers: int) -> tuple[int, int, int]:
    """(steps per epoch, labeled passes, unlabeled passes): an epoch is one pass over the larger
    stream; the smaller one is repeated (whole passes) to supply as many batches."""
    b_l = data.batch_size
    b_u = data.unlabeled_batch_size or data.batch_size
    steps = []
    for rows, batch, what in (
        (plan.labeled_rows, b_l, "labeled"),
        (plan.unlabeled_rows, b_u, "unlabeled"),
    ):
        n = (rows // num_workers) // batch
        if n < 1:
            raise DatasetError(
                f"{rows} {what} rows are too few for {num_workers} worker(s) x batch {batch} "
                f"(need at least {num_workers * batch})"
            )
        steps.append(n)
    total = max(steps)
    passes = [
        math.ceil(total * b * num_workers / r)
        for r, b in ((plan.labeled_rows, b_l), (plan.unlabeled_rows, b_u))
    ]
    return total, passes[0], passes[1]


__all__ = ["SemiSupPlan", "labeled_selection", "plan_semisup", "semisup_steps"]
