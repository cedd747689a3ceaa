"""The on-disk dataset format: parquet shards per split plus a `dataset.json` manifest.

    <root>/dataset.json                 # DatasetInfo; written LAST, so its presence = complete
    <root>/train/part-00000.parquet     # SHARD_SCHEMA rows, encoded images (never raw pixels)
    <root>/val/part-00000.parquet

    with ShardWriter(root, "train") as w:
        w.add("img-1", png_bytes, mask_png_bytes, mask_labels(mask), height, width)
    info = DatasetInfo("mine", 3, ["bg", "a", "b"], palette, splits={"train": w.info})
    info.save(root)

`root` is a local folder or a URI understood by `pyarrow.fs.FileSystem.from_uri` (s3://, gs://,
file://, ...). A shard is written under a temporary name and renamed, so a reader never sees a
half-written `part-*.parquet`. Shards carry parquet page checksums (CRC-32 per page) and are
read with verification, so bytes corrupted at rest are detected instead of decoding into wrong
pixels; a corrupted `image`/`mask` page costs only its rows (see `read_shard_table`). Shards
written before checksums were added read as before (pages without a CRC are not checked).
The image/mask byte codecs (`encode_png`, `decode_image`, `decode_mask`, `mask_labels`,
`check_png_crcs`) live in images.py and are re-exported here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from components.data.images import (
    check_png_crcs,
    decode_image,
    decode_mask,
    encode_png,
    mask_labels,
)

if TYPE_CHECKING:
    from types import TracebackType

    from typing_extensions import Self

SHARD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # PNG/JPEG bytes as on disk
        pa.field("mask", pa.binary(), nullable=True),  # PNG of uint8 class ids, 255 = ignore
        pa.field("image_labels", pa.list_(pa.int16()), nullable=False),  # sorted, no ignore
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
    ]
)
MANIFEST = "dataset.json"
SHARD_PATTERN = "part-*.parquet"
# Row-group-level salvage: cells of these columns in a page that fails its checksum become empty
# bytes, which every decoder rejects, so their rows are counted as bad rows (`valid` False).
SALVAGEABLE = ("image", "mask")

log = logging.getLogger("segdistill.data")


class DatasetError(ValueError):
    """A missing or malformed dataset; the message names the file or folder."""


# ----------------------------------------------------------------------------------------------
# Filesystems


def resolve_fs(root: str) -> tuple[pafs.FileSystem, str]:
    """`root` (local path or URI) -> (pyarrow filesystem, path inside it).

    Local paths become absolute paths on a `LocalFileSystem`, so results do not depend on a later
    change of working directory.
    """
    if "://" not in root:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(root))
    try:
        fs, path = pafs.FileSystem.from_uri(root)
    except (pa.ArrowException, ValueError) as e:
        raise DatasetError(f"{root}: cannot open this location: {e}") from e
    return fs, path.rstrip("/")


def _join(root: str, *parts: str) -> str:
    """A path below `root` in the caller's own spelling (URI stays URI, local stays local)."""
    if "://" in root:
        return "/".join([root.rstrip("/"), *parts])
    return os.path.join(os.path.abspath(os.path.expanduser(root)), *parts)


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write `data` to `path` under a temporary name, then move it into place."""
    # On local and POSIX-like filesystems the rename is atomic. On object stores (S3, GCS) the
    # move is a copy+delete, but a completed single PUT is atomic anyway, so the temp name only
    # costs one extra request there.
    tmp = f"{path.rsplit('/', 1)[0]}/.{path.rsplit('/', 1)[1]}.tmp-{os.getpid()}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


# ----------------------------------------------------------------------------------------------
# Manifest


@dataclass
class SplitInfo:
    """One split: row count, shard file names relative to the split folder, largest image."""

    rows: int
    shards: list[str]
    max_height: int
    max_width: int


@dataclass
class DatasetInfo:
    """The contents of `dataset.json`. `palette[c]` is the RGB colour of class c."""

    name: str
    num_classes: int
    class_names: list[str]
    palette: list[list[int]]
    ignore_index: int = 255
    splits: dict[str, SplitInfo] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, source: str = "dataset.json") -> DatasetInfo:
        """Parse and check; raises DatasetError naming `source` and the offending field."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{source}: not valid JSON: {e}") from e
        if not isinstance(d, dict):
            raise DatasetError(f"{source}: expected a JSON object, got {type(d).__name__}")

        def need(obj: dict, key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
            if key not in obj:
                raise DatasetError(f"{source}: missing field '{where}{key}'")
            value = obj[key]
            # bool is an int subclass; a true/false count is a typo, not a number
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
                raise DatasetError(f"{source}: field '{where}{key}' has the wrong type")
            return value

        name = need(d, "name", str)
        num_classes = need(d, "num_classes", int)
        class_names = need(d, "class_names", list)
        palette = need(d, "palette", list)
        ignore_index = need(d, "ignore_index", int) if "ignore_index" in d else 255
        if num_classes < 1:
            raise DatasetError(f"{source}: field 'num_classes' must be >= 1, got {num_classes}")
        if len(class_names) != num_classes:
            raise DatasetError(
                f"{source}: field 'class_names' has {len(class_names)} entries "
                f"but num_classes is {num_classes}"
            )
        if len(palette) != num_classes or not all(
            isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) for v in c)
            for c in palette
        ):
            raise DatasetError(
                f"{source}: field 'palette' must hold {num_classes} [r, g, b] integer triples"
            )
        splits = {}
        for split, s in (need(d, "splits", dict) if "splits" in d else {}).items():
            where = f"splits.{split}."
            if not isinstance(s, dict):
                raise DatasetError(f"{source}: field 'splits.{split}' must be an object")
            splits[split] = SplitInfo(
                rows=need(s, "rows", int, where),
                shards=need(s, "shards", list, where),
                max_height=need(s, "max_height", int, where),
                max_width=need(s, "max_width", int, where),
            )
        return cls(name, num_classes, class_names, palette, ignore_index, splits)

    @classmethod
    def load(cls, root: str) -> DatasetInfo:
        """Read `<root>/dataset.json`; raises DatasetError naming the path."""
        fs, path = resolve_fs(root)
        source = _join(root, MANIFEST)
        try:
            with fs.open_input_stream(f"{path}/{MANIFEST}") as f:
                text = f.read().decode("utf-8")
        except FileNotFoundError as e:
            raise DatasetError(f"{source}: not found (is {root} a dataset folder?)") from e
        except (OSError, UnicodeDecodeError) as e:
            raise DatasetError(f"{source}: cannot read: {e}") from e
        return cls.from_json(text, source)

    def save(self, root: str) -> None:
        """Write `<root>/dataset.json` atomically. Writers call this after every split is done."""
        fs, path = resolve_fs(root)
        fs.create_dir(path, recursive=True)
        write_atomic(fs, f"{path}/{MANIFEST}", self.to_json().encode("utf-8"))


# ----------------------------------------------------------------------------------------------
# Writing


class ShardWriter:
    """Append rows to one split; shards roll over at `target_shard_bytes` of encoded data.

    Opening a writer replaces the split: leftover `part-*.parquet` files (from an interrupted or
    earlier write) are removed first, because readers take every shard in the folder. Leaving the
    `with` block on an exception writes nothing more, so rows after the last full shard are lost
    and no `dataset.json` exists yet: the dataset reads as incomplete.
    """

    def __init__(
        self,
        root: str,
        split: str,
        target_shard_bytes: int = 64 * 2**20,
        row_group_rows: int = 256,
    ) -> None:
        if target_shard_bytes <= 0 or row_group_rows <= 0:
            raise ValueError("target_shard_bytes and row_group_rows must be positive")
        self.fs, root_path = resolve_fs(root)
        self.dir = f"{root_path}/{split}"
        self.target_shard_bytes = target_shard_bytes
        self.row_group_rows = row_group_rows
        self.fs.create_dir(self.dir, recursive=True)
        for info in self.fs.get_file_info(pafs.FileSelector(self.dir)):
            if fnmatch(info.base_name, SHARD_PATTERN) or fnmatch(info.base_name, ".part-*.tmp"):
                self.fs.delete_file(info.path)
        self._rows: dict[str, list] = {col: [] for col in SHARD_SCHEMA.names}
        self._bytes = 0
        self._ids: set[str] = set()
        self._shards: list[str] = []
        self._max_height = 0
        self._max_width = 0
        self.info: SplitInfo | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()

    def add(
        self,
        id: str,
        image: bytes,
        mask: bytes | None,
        image_labels: list[int],
        height: int,
        width: int,
    ) -> None:
        """Queue one row; writes a shard once the queued encoded bytes reach the target."""
        if self.info is not None:
            raise ValueError(f"{self.dir}: writer is closed")
        if id in self._ids:
            raise ValueError(f"{self.dir}: duplicate id '{id}'")
        # checked here so that a bad row is named now, not at the next shard flush
        if not isinstance(image, bytes) or not image:
            raise ValueError(f"{self.dir}: row '{id}': image must be non-empty encoded bytes")
        if mask is not None and not isinstance(mask, bytes):
            raise ValueError(f"{self.dir}: row '{id}': mask must be encoded bytes or None")
        if height <= 0 or width <= 0:
            raise ValueError(f"{self.dir}: row '{id}': bad size {height}x{width}")
        self._ids.add(id)
        for name, value in zip(
            SHARD_SCHEMA.names, (id, image, mask, list(image_labels), height, width)
        ):
            self._rows[name].append(value)
        self._bytes += len(image) + (len(mask) if mask is not None else 0)
        self._max_height = max(self._max_height, height)
        self._max_width = max(self._max_width, width)
        if self._bytes >= self.target_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._rows["id"]:
            return
        table = pa.Table.from_pydict(self._rows, schema=SHARD_SCHEMA)
        name = f"part-{len(self._shards):05d}.parquet"
        tmp = f"{self.dir}/.{name}.tmp"
        try:
            with self.fs.open_output_stream(tmp) as f:
                pq.write_table(
                    table, f, row_group_size=self.row_group_rows, write_page_checksum=True
                )
        except BaseException:
            with contextlib.suppress(OSError):
                self.fs.delete_file(tmp)
            raise
        # atomic locally; see write_atomic for object stores
        self.fs.move(tmp, f"{self.dir}/{name}")
        self._shards.append(name)
        self._rows = {col: [] for col in SHARD_SCHEMA.names}
        self._bytes = 0

    def close(self) -> SplitInfo:
        """Write the last shard and return the split's SplitInfo (also kept as `self.info`)."""
        if self.info is None:
            self._flush()
            self.info = SplitInfo(
                len(self._ids), list(self._shards), self._max_height, self._max_width
            )
        return self.info


# ----------------------------------------------------------------------------------------------
# Reading


def list_shards(root: str, split: str) -> list[str]:
    """Full paths (URIs for URI roots) of the split's `part-*.parquet`, sorted.

    Raises DatasetError naming the folder when it is missing or holds no shard.
    """
    fs, root_path = resolve_fs(root)
    folder = _join(root, split)
    if fs.get_file_info(f"{root_path}/{split}").type != pafs.FileType.Directory:
        raise DatasetError(f"{folder}: split folder not found")
    names = sorted(
        info.base_name
        for info in fs.get_file_info(pafs.FileSelector(f"{root_path}/{split}"))
        if info.type == pafs.FileType.File and fnmatch(info.base_name, SHARD_PATTERN)
    )
    if not names:
        raise DatasetError(f"{folder}: no {SHARD_PATTERN} shards")
    return [_join(root, split, n) for n in names]


def iter_shard_tables(
    root: str, split: str, columns: list[str] | None = None, problems: list[str] | None = None
) -> Iterator[tuple[str, pa.Table]]:
    """(shard, table) for every shard of a split, one at a time (in shard order); see
    `read_shard_table` for the checks and for `problems`."""
    for shard in list_shards(root, split):
        yield shard, read_shard_table(root, split, shard, columns, problems)


def read_shard_table(
    root: str,
    split: str,
    shard: str,
    columns: list[str] | None = None,
    problems: list[str] | None = None,
) -> pa.Table:
    """One shard (a path from `list_shards`), its page checksums verified.

    A shard without one of `columns` raises DatasetError naming the shard, the column and what
    it has; so does one that cannot be read at all. When only `image`/`mask` pages fail their
    checksum, the shard is read row group by row group and the cells of each failing column in
    a failing row group become empty bytes: those rows then count as bad rows when decoded (the
    same path as any undecodable file), and the rest of the shard is used. Each such loss is
    logged and, when `problems` is a list, appended to it.
    """
    fs, root_path = resolve_fs(root)
    path = f"{root_path}/{split}/{shard.rsplit('/', 1)[-1]}"
    try:
        return pq.read_table(path, columns=columns, filesystem=fs, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as e:
        if _checksum_failed(e):
            return _salvage(path, fs, shard, columns, problems)
        names = _schema_names(path, fs)
        absent = [c for c in columns or [] if names is not None and c not in names]
        if absent:
            raise DatasetError(f"{shard}: no '{absent[0]}' column (has {names})") from e
        raise DatasetError(f"{shard}: cannot read shard: {e}") from e


def _schema_names(path: str, fs: pafs.FileSystem) -> list[str] | None:
    try:
        return pq.read_schema(path, filesystem=fs).names
    except (pa.ArrowException, OSError):
        return None


def _checksum_failed(e: Exception) -> bool:
    # pyarrow raises a plain OSError; its message is the only way to tell a bad page checksum
    return "checksum verification failed" in str(e).lower()


def _salvage(
    path: str,
    fs: pafs.FileSystem,
    shard: str,
    columns: list[str] | None,
    problems: list[str] | None,
) -> pa.Table:
    """Read a shard with corrupted pages row group by row group (see `read_shard_table`)."""
    try:
        f = pq.ParquetFile(path, filesystem=fs, page_checksum_verification=True)
        schema = f.schema_arrow
        names = list(columns or schema.names)
        fields = [schema.field(n) for n in names]
    except (pa.ArrowException, OSError, KeyError) as e:
        raise DatasetError(f"{shard}: cannot read shard: {e}") from e
    parts, first_row = [], 0
    for g in range(f.num_row_groups):
        rows = f.metadata.row_group(g).num_rows
        try:
            parts.append(f.read_row_group(g, columns=names))
        except (pa.ArrowException, OSError):
            arrays, lost = [], []
            for name in names:
                try:
                    arrays.append(f.read_row_group(g, columns=[name]).column(0))
                except (pa.ArrowException, OSError) as e:
                    if name not in SALVAGEABLE or not _checksum_failed(e):
                        raise DatasetError(
                            f"{shard}: corrupted (column '{name}', row group {g}: {e}); "
                            "convert or copy the dataset again"
                        ) from e
                    arrays.append(pa.chunked_array([pa.array([b""] * rows, pa.binary())]))
                    lost.append(name)
            note = (
                f"{shard}: rows {first_row}..{first_row + rows - 1} (row group {g}): "
                f"{'/'.join(lost)} page checksum mismatch, these rows are bad"
            )
            log.warning("%s", note)
            if problems is not None:
                problems.append(note)
            parts.append(pa.Table.from_arrays(arrays, schema=pa.schema(fields)))
        first_row += rows
    return pa.concat_tables(parts) if parts else schema.empty_table().select(names)


def read_shard_tables(root: str, split: str, columns: list[str] | None = None) -> list[pa.Table]:
    """Every shard of a split as its own in-memory table (in shard order)."""
    return [table for _, table in iter_shard_tables(root, split, columns)]


def read_split_table(
    root: str, split: str, columns: list[str] | None = None, problems: list[str] | None = None
) -> pa.Table:
    """A whole split in memory — for tests and small evaluations, not for training ingest."""
    return pa.concat_tables(table for _, table in iter_shard_tables(root, split, columns, problems))


__all__ = [
    "SHARD_SCHEMA",
    "DatasetError",
    "DatasetInfo",
    "ShardWriter",
    "SplitInfo",
    "check_png_crcs",
    "decode_image",
    "decode_mask",
    "encode_png",
    "list_shards",
    "mask_labels",
    "read_shard_table",
    "read_split_table",
    "resolve_fs",
]
