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
- An output folder is only written into when it is absent, empty, or holds the same conversion
  (`<out>/_progress/conversion.json`: the source, its input folders and the options that choose
  the items; see `conversion_identity`). Anything else is refused, naming what the folder holds;
  `overwrite=True` first removes the files a conversion writes, and refuses when the folder
  holds any other file (`claim_output`).
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
CONVERSION = "conversion.json"  # in PROGRESS: which conversion the folder holds


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
        table = pa.Table.from_pydict(rows, schema=SHARD_SCHEMA)
        pq.write_table(table, buf, row_group_size=64, write_page_checksum=True)
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

    def __init__(self, label: str, total: int, stream=None):
        # sys.stderr looked up now, not at import: it may have been replaced since (pytest)
        self.label, self.total, self.stream = label, total, stream or sys.stderr
        self.tty = self.stream.isatty()
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
    options: dict | None = None,
    overwrite: bool = False,
) -> Report:
    """Convert (or finish converting) `source` into `out`; see the module docstring.

    `options`: what the caller chose that divides the items differently (a labeled subset),
    part of the conversion's identity. `overwrite`: replace a different dataset at `out`.
    """
    if shard_rows < 1:
        raise ValueError("shard_rows must be >= 1")
    splits = source.splits() if splits is None else splits
    claim_output(out, conversion_identity(source, options), overwrite)
    fs, path = resolve_fs(out)
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


# ----------------------------------------------------------------------------------------------
# The output folder: never replace another dataset by accident


def conversion_identity(source: Source, options: dict | None = None) -> dict:
    """What makes two runs the same conversion: the source kind, its inputs (a source's own
    `identity()` when it has one, else its absolute `root`) and the item-choosing `options`.
    Workers, shard size and the bad-item tolerance are not part of it: changing them resumes."""
    own = source.identity() if hasattr(source, "identity") else {"root": _absolute(source.root)}
    ident = {"dataset": source.name, **own, "options": options or {}}
    return json.loads(json.dumps(ident, sort_keys=True))  # tuples -> lists, as read back


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def _ours(rel: str, is_dir: bool) -> bool:
    """Whether a path (relative to an output folder) is one the shard writers write there:
    dataset.json, split folders of part-*.parquet, the progress records, and their temp files."""
    parts = rel.split("/")
    if is_dir:
        return len(parts) == 1 or (len(parts) == 2 and parts[0] == PROGRESS)
    name = parts[-1]
    if len(parts) == 1:
        return name == MANIFEST or fnmatch(name, f".{MANIFEST}.tmp-*")
    if parts[0] == PROGRESS:
        if len(parts) == 2:
            return name == CONVERSION or fnmatch(name, f".{CONVERSION}.tmp-*")
        return len(parts) == 3 and (
            fnmatch(name, "part-*.parquet.json") or fnmatch(name, ".part-*.parquet.json.tmp-*")
        )
    return len(parts) == 2 and (fnmatch(name, SHARD_PATTERN) or fnmatch(name, ".part-*.tmp*"))


@dataclass
class OutputFolder:
    """What an output folder holds, read without changing it (`inspect_output`)."""

    out: str  # as the user wrote it, for messages
    files: list[str]  # files the shard writers write (filesystem paths), deepest last
    folders: list[str]  # their folders (filesystem paths)
    foreign: list[str]  # anything else, relative to the folder
    dataset: str | None  # dataset.json's `name` ("?" when unreadable), None without one
    conversion: dict | None  # _progress/conversion.json, None without one

    @property
    def empty(self) -> bool:
        return not (self.files or self.foreign)

    def describe(self) -> str:
        """What is there, in words: the dataset's name and where it was converted from."""
        parts = []
        if self.dataset is not None:
            parts.append(f"the dataset '{self.dataset}' ({MANIFEST})")
        if self.conversion is not None:
            parts.append(_describe_conversion(self.conversion, finished=self.dataset is not None))
        if not parts and self.files:
            parts.append(f"dataset files without {MANIFEST} (an unfinished dataset)")
        if self.foreign:
            parts.append(f"other files (e.g. '{self.foreign[0]}')")
        return " and ".join(parts)

    def refusal(self, wanted: str) -> DatasetError:
        """The error for a folder that holds something other than `wanted`."""
        return DatasetError(
            f"{self.out}: holds {self.describe()}, not {wanted}; refusing to replace it: pass "
            "--overwrite to replace it, or choose another --out"
        )


def _describe_conversion(record: dict, finished: bool) -> str:
    """'a conversion of voc from root /data' (+ its options, + unfinished) for messages."""
    inputs = ", ".join(
        f"{k} {v}" for k, v in record.items() if k not in ("dataset", "options") and v
    )
    text = f"a conversion of {record.get('dataset', '?')}"
    if inputs:
        text += f" from {inputs}"
    if record.get("options"):
        text += f" with options {json.dumps(record['options'], sort_keys=True)}"
    return text if finished else f"{text}, unfinished (no {MANIFEST})"


def inspect_output(out: str) -> OutputFolder:
    """Read what `out` holds; raises DatasetError when it is a file or cannot be listed."""
    fs, path = resolve_fs(out)
    kind = fs.get_file_info(path).type
    state = OutputFolder(out, [], [], [], None, None)
    if kind == pafs.FileType.NotFound:
        return state
    if kind != pafs.FileType.Directory:
        raise DatasetError(f"{out}: exists and is not a folder; choose another --out")
    try:
        entries = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as e:
        raise DatasetError(f"{out}: cannot list the folder: {e}") from e
    for info in sorted(entries, key=lambda i: i.path):
        rel = info.path[len(path) :].lstrip("/")
        is_dir = info.type == pafs.FileType.Directory
        if not _ours(rel, is_dir):
            state.foreign.append(rel + ("/" if is_dir else ""))
        else:
            (state.folders if is_dir else state.files).append(info.path)
    if f"{path}/{MANIFEST}" in state.files:
        record = _read_record(fs, f"{path}/{MANIFEST}")
        state.dataset = str(record.get("name", "?")) if isinstance(record, dict) else "?"
    if f"{path}/{PROGRESS}/{CONVERSION}" in state.files:
        record = _read_record(fs, f"{path}/{PROGRESS}/{CONVERSION}")
        state.conversion = record if isinstance(record, dict) else {"dataset": "?"}
    return state


def clear_output(state: OutputFolder) -> None:
    """Remove the files the shard writers wrote in a folder (`inspect_output`), only those:
    a folder holding anything else is refused, naming one such entry."""
    if state.foreign:
        raise DatasetError(
            f"{state.out}: holds files this project does not write (e.g. '{state.foreign[0]}'); "
            "not removing anything, even with --overwrite: choose another --out, or move those "
            "files away yourself"
        )
    fs, _ = resolve_fs(state.out)
    for p in state.files:
        fs.delete_file(p)
    for p in sorted(state.folders, key=len, reverse=True):  # deepest first: they are empty now
        fs.delete_dir(p)


def claim_output(out: str, identity: dict, overwrite: bool = False) -> None:
    """Make `out` ready for the conversion `identity` (`conversion_identity`), or refuse.

    Accepted as it is: no folder, an empty one, or one holding this same conversion (to resume
    or redo it). Anything else (another dataset, another source folder, other options, files
    that are no dataset) raises DatasetError naming the folder and what it holds, unless
    `overwrite`: then `clear_output` removes the old dataset's files first. The identity is
    recorded before any shard is written, so an interrupted run is recognised next time.
    """
    state = inspect_output(out)
    same = state.conversion == identity
    if not state.empty and (overwrite or not same):
        if not overwrite:
            raise state.refusal(f"this conversion ({identity['dataset']})")
        clear_output(state)
    fs, path = resolve_fs(out)
    fs.create_dir(f"{path}/{PROGRESS}", recursive=True)
    write_atomic(fs, f"{path}/{PROGRESS}/{CONVERSION}", json.dumps(identity, indent=2).encode())


def bad_summary(report: Report, limit: int = 50) -> str:
    lines = [f"{len(report.bad)} of {report.items} items skipped:"]
    lines += [f"  {split}/{item}: {reason}" for split, item, reason in report.bad[:limit]]
    if len(report.bad) > limit:
        lines.append(f"  ... and {len(report.bad) - limit} more (all in {PROGRESS}/)")
    return "\n".join(lines)


__all__ = [
    "BadItem",
    "Item",
    "OutputFolder",
    "Report",
    "Sample",
    "Source",
    "bad_summary",
    "check_mask",
    "claim_output",
    "clear_output",
    "conversion_identity",
    "convert",
    "image_size",
    "inspect_output",
    "labeled_subset",
    "read_file",
]
