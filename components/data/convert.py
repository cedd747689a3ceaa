"""Convert a dataset as distributed (image and label files) into parquet shards, resumably.

    source = Cityscapes("/data/cityscapes")               # a Source: lists items, loads one
    report = convert(source, "s3://bucket/shards/cityscapes", workers=8)
    report.ok                                             # False: too many bad files

How it works:
- Each split's items are sorted by id and cut into fixed chunks of `shard_rows`; chunk k becomes
  `<split>/part-k.parquet`. A process pool converts chunks in parallel.
- A chunk is done when `<out>/_progress/<split>/part-k.json` exists, names the same item ids
  (by hash) and lists no bad files (those chunks are retried: the files may have been fixed).
  The record is written after its shard (both atomically), so a rerun skips finished chunks and
  redoes the rest; an interrupted run never leaves a shard that looks finished but is not.
- Bad files (missing, undecodable, image/mask size mismatch, label ids outside the dataset's
  set) are skipped and listed with their reason in the progress record and the final summary.
- `dataset.json` is removed when a conversion starts work and written last, only when every
  chunk is done and at most `max_bad_fraction` of the items were bad.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from fnmatch import fnmatch
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from components.data.labeled import labeled_subset
from components.data.shards import (
    MANIFEST,
    SHARD_PATTERN,
    SHARD_SCHEMA,
    DatasetError,
    DatasetInfo,
    SplitInfo,
    decode_image,
    encode_png,
    mask_labels,
    resolve_fs,
    write_atomic,
)

PROGRESS = "_progress"


class BadItem(Exception):
    """One input file pair that cannot be converted; the message is the reason."""


@dataclass(frozen=True)
class Item:
    """One sample as distributed: its id, image file and label file (None: no label)."""

    id: str
    image: str
    label: str | None = None
    extra: Any = None  # a source's own data for this item (COCO: its annotations)


@dataclass
class Sample:
    image: bytes  # the image file's bytes as distributed (JPEG/PNG), never re-encoded
    mask: np.ndarray | None  # (H, W) uint8 class ids, 255 = ignore
    height: int
    width: int


class Source(Protocol):
    """A dataset as distributed. Must be picklable (it travels to the worker processes)."""

    name: str
    class_names: list[str]
    palette: list[list[int]]

    def splits(self) -> dict[str, list[Item]]:
        """Items per output split; raises DatasetError naming a missing folder or list file."""

    def load(self, item: Item) -> Sample:
        """Read and check one item; raises BadItem with the reason."""


def read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise BadItem(f"missing file {path}") from e
    except OSError as e:
        raise BadItem(f"cannot read {path}: {e}") from e
    if not data:
        raise BadItem(f"empty file {path}")
    return data


def image_size(data: bytes, path: str) -> tuple[int, int]:
    """(height, width) of an encoded image; decodes it fully so a truncated file is caught."""
    try:
        array = decode_image(data)
    except ValueError as e:
        raise BadItem(f"unreadable image {path}: {e}") from e
    return int(array.shape[0]), int(array.shape[1])


def check_mask(mask: np.ndarray, height: int, width: int, path: str, allowed: set[int]) -> None:
    if mask.shape != (height, width):
        raise BadItem(
            f"mask {path} is {mask.shape[0]}x{mask.shape[1]} but its image is {height}x{width}"
        )
    present = set(np.flatnonzero(np.bincount(mask.ravel(), minlength=256)).tolist())
    outside = sorted(present - allowed)
    if outside:
        raise BadItem(f"label ids {outside} outside the dataset's set in {path}")


# ----------------------------------------------------------------------------------------------
# Conversion


@dataclass
class Chunk:
    split: str
    index: int
    items: list[Item]

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}.parquet"

    @property
    def digest(self) -> str:
        return hashlib.sha256("\n".join(it.id for it in self.items).encode()).hexdigest()


@dataclass
class Report:
    rows: dict[str, int] = field(default_factory=dict)
    bad: list[tuple[str, str, str]] = field(default_factory=list)  # (split, id, reason)
    items: int = 0
    skipped_chunks: int = 0
    written_chunks: int = 0
    ok: bool = True

    @property
    def bad_fraction(self) -> float:
        return len(self.bad) / self.items if self.items else 0.0


def _convert_chunk(source: Source, root: str, chunk: Chunk) -> dict:
    """Worker: load, check and write one chunk; returns its progress record."""
    rows: dict[str, list] = {c: [] for c in SHARD_SCHEMA.names}
    bad, max_h, max_w = [], 0, 0
    for item in chunk.items:
        try:
            s = source.load(item)
        except BadItem as e:
            bad.append([item.id, str(e)])
            continue
        mask = None if s.mask is None else encode_png(s.mask)
        labels = [] if s.mask is None else mask_labels(s.mask)
        for name, value in zip(
            SHARD_SCHEMA.names, (item.id, s.image, mask, labels, s.height, s.width)
        ):
            rows[name].append(value)
        max_h, max_w = max(max_h, s.height), max(max_w, s.width)
    fs, path = resolve_fs(root)
    folder = f"{path}/{chunk.split}"
    fs.create_dir(folder, recursive=True)
    fs.create_dir(f"{path}/{PROGRESS}/{chunk.split}", recursive=True)
    if rows["id"]:
        buf = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pydict(rows, schema=SHARD_SCHEMA), buf, row_group_size=64)
        write_atomic(fs, f"{folder}/{chunk.name}", buf.getvalue().to_pybytes())
    elif fs.get_file_info(f"{folder}/{chunk.name}").type == pafs.FileType.File:
        fs.delete_file(f"{folder}/{chunk.name}")  # an earlier run's rows: readers take every shard
    record = {
        "digest": chunk.digest,
        "rows": len(rows["id"]),
        "shard": chunk.name if rows["id"] else None,
        "bad": bad,
        "max_height": max_h,
        "max_width": max_w,
    }
    progress = f"{path}/{PROGRESS}/{chunk.split}/{chunk.name}.json"
    write_atomic(fs, progress, json.dumps(record).encode())
    return record


def _read_record(fs: pafs.FileSystem, path: str) -> dict | None:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except (FileNotFoundError, OSError, json.JSONDecodeError):
        return None


class _Progress:
    """One line per update on a terminal (rewritten in place), every 10 s otherwise."""

    def __init__(self, label: str, total: int, stream=sys.stderr):
        self.label, self.total, self.stream = label, total, stream
        self.tty = stream.isatty()
        self.last = time.monotonic()

    def update(self, done: int, rows: int, bad: int, final: bool = False) -> None:
        now = time.monotonic()
        if not (final or self.tty or now - self.last >= 10):
            return
        self.last = now
        width = 30
        filled = int(width * done / self.total) if self.total else width
        text = (
            f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} shards, "
            f"{rows} rows, {bad} bad"
        )
        end = "\n" if final or not self.tty else ""
        self.stream.write(("\r" if self.tty else "") + text + end)
        self.stream.flush()


def convert(
    source: Source,
    out: str,
    workers: int | None = None,
    shard_rows: int = 500,
    max_bad_fraction: float = 0.0,
    splits: dict[str, list[Item]] | None = None,
    log=print,
) -> Report:
    """Convert (or finish converting) `source` into `out`; see the module docstring."""
    if shard_rows < 1:
        raise ValueError("shard_rows must be >= 1")
    splits = source.splits() if splits is None else splits
    fs, path = resolve_fs(out)
    fs.create_dir(path, recursive=True)
    report = Report()
    plan: dict[str, list[Chunk]] = {}
    for split, items in splits.items():
        items = sorted(items, key=lambda it: it.id)
        dup = next((a.id for a, b in itertools.pairwise(items) if a.id == b.id), None)
        if dup is not None:
            raise DatasetError(f"{source.name} {split}: duplicate item id '{dup}'")
        plan[split] = [
            Chunk(split, k, items[i : i + shard_rows])
            for k, i in enumerate(range(0, len(items), shard_rows))
        ]
        report.items += len(items)

    records: dict[tuple[str, int], dict] = {}
    todo: list[Chunk] = []
    for split, chunks in plan.items():
        for c in chunks:
            rec = _read_record(fs, f"{path}/{PROGRESS}/{split}/{c.name}.json")
            # the record's shard must exist, or (a chunk with no usable rows) must not
            has_shard = fs.get_file_info(f"{path}/{split}/{c.name}").type == pafs.FileType.File
            if (
                rec is not None
                and rec.get("digest") == c.digest
                and has_shard == (rec.get("shard") is not None)
                and not rec.get("bad")  # a chunk with bad files is retried: they may be fixed
            ):
                records[(split, c.index)] = rec
                report.skipped_chunks += 1
            else:
                todo.append(c)
    stale = [
        p
        for split, chunks in plan.items()
        for p in _stale(fs, f"{path}/{split}", f"{path}/{PROGRESS}/{split}", len(chunks))
    ]
    if todo or stale:
        # From here until the end the folder is being changed: it must not read as complete.
        if fs.get_file_info(f"{path}/{MANIFEST}").type == pafs.FileType.File:
            fs.delete_file(f"{path}/{MANIFEST}")
        for p in stale:
            fs.delete_file(p)
    if todo and report.skipped_chunks:
        log(f"resuming: {report.skipped_chunks} of {report.skipped_chunks + len(todo)} "
            "shards already done")  # fmt: skip
    bar = _Progress(f"{source.name}", len(todo))
    done = rows = bad = 0
    workers = min(max(1, workers or (os.cpu_count() or 1)), max(1, len(todo)))

    def finished(c: Chunk, rec: dict) -> None:
        nonlocal done, rows, bad
        records[(c.split, c.index)] = rec
        done, rows, bad = done + 1, rows + rec["rows"], bad + len(rec["bad"])
        bar.update(done, rows, bad)

    if todo and workers == 1:
        for c in todo:
            finished(c, _convert_chunk(source, out, c))
    elif todo:
        # spawn, not fork: the caller may hold threads (Ray, gRPC) that a forked child inherits
        # in an undefined state.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            pending = {pool.submit(_convert_chunk, source, out, c): c for c in todo}
            while pending:
                ready, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in ready:
                    finished(pending.pop(fut), fut.result())
    if todo:
        bar.update(done, rows, bad, final=True)
        report.written_chunks = done

    info = DatasetInfo(source.name, len(source.class_names), source.class_names, source.palette)
    for split, chunks in plan.items():
        recs = [records[(split, c.index)] for c in chunks]
        report.rows[split] = sum(r["rows"] for r in recs)
        report.bad += [(split, i, reason) for r in recs for i, reason in r["bad"]]
        info.splits[split] = SplitInfo(
            rows=report.rows[split],
            shards=[r["shard"] for r in recs if r["shard"]],
            max_height=max((r["max_height"] for r in recs), default=0),
            max_width=max((r["max_width"] for r in recs), default=0),
        )
        if report.rows[split] == 0:
            report.ok = False
            log(f"{source.name} {split}: no usable items")
    if report.bad_fraction > max_bad_fraction:
        report.ok = False
    if report.ok:
        info.save(out)  # last: its presence means the dataset is complete
    elif fs.get_file_info(f"{path}/{MANIFEST}").type == pafs.FileType.File:
        fs.delete_file(f"{path}/{MANIFEST}")  # an earlier, laxer run's: not valid for this one
    return report


def _stale(fs: pafs.FileSystem, folder: str, progress: str, chunks: int) -> list[str]:
    """Shards and records numbered beyond this plan (left by a run with other settings)."""
    found = []
    for base, pattern in ((folder, SHARD_PATTERN), (progress, "part-*.parquet.json")):
        if fs.get_file_info(base).type != pafs.FileType.Directory:
            continue
        for info in fs.get_file_info(pafs.FileSelector(base)):
            name = info.base_name
            if fnmatch(name, pattern) and int(name[5:10]) >= chunks:
                found.append(info.path)
    return found


def bad_summary(report: Report, limit: int = 50) -> str:
    lines = [f"{len(report.bad)} of {report.items} items skipped:"]
    lines += [f"  {split}/{item}: {reason}" for split, item, reason in report.bad[:limit]]
    if len(report.bad) > limit:
        lines.append(f"  ... and {len(report.bad) - limit} more (all in {PROGRESS}/)")
    return "\n".join(lines)


__all__ = [
    "BadItem",
    "Item",
    "Report",
    "Sample",
    "Source",
    "bad_summary",
    "check_mask",
    "convert",
    "image_size",
    "labeled_subset",
    "read_file",
]
