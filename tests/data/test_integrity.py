"""Corrupted bytes are detected, never decoded into wrong pixels: PNG chunk CRCs on decode, and
parquet page checksums written by both shard writers and verified on read. A corrupted row is a
bad row (`valid` False, named by verify), the rest of its shard is still used."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from components.data.convert import convert
from components.data.images import check_png_crcs, decode_image, decode_mask, encode_png
from components.data.shards import (
    DatasetError,
    DatasetInfo,
    ShardWriter,
    list_shards,
    read_shard_table,
    read_split_table,
)
from components.data.sources import FolderSource
from components.data.transforms import decode_train_batch
from components.data.verify import verify


def _flat_image() -> np.ndarray:
    """Flat colour areas: a very compressible PNG, where a few flipped bytes of image data
    often still inflate (into wrong pixels) without zlib noticing."""
    img = np.zeros((64, 96, 3), np.uint8)
    img[10:40, 20:70] = (200, 30, 10)
    img[45:, :] = (0, 90, 250)
    return img


def _idat(png: bytes) -> tuple[int, int]:
    """(offset of the data, length) of the first IDAT chunk."""
    at = png.find(b"IDAT")
    return at + 4, int.from_bytes(png[at - 4 : at], "big")


def _flipped(data: bytes, start: int, count: int) -> bytes:
    out = bytearray(data)
    for k in range(start, start + count):
        out[k] ^= 0xFF
    return bytes(out)


def _pillow_alone(data: bytes) -> np.ndarray | None:
    """What Pillow makes of the bytes by itself (None: it noticed)."""
    try:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    except (OSError, ValueError, SyntaxError):
        return None


def test_flipped_png_bytes_never_decode_into_wrong_pixels():
    image = _flat_image()
    png = encode_png(image)
    start, length = _idat(png)
    corrupted = [_flipped(png, start + off, 8) for off in range(length - 8)]
    # The hazard: Pillow checks no IDAT CRC, so some of these decode quietly into wrong pixels.
    quiet = [c for c in corrupted if (a := _pillow_alone(c)) is not None and (a != image).any()]
    assert quiet, "the fixture no longer shows the hazard; pick another image"
    for data in corrupted:
        with pytest.raises(ValueError, match="CRC mismatch in chunk b'IDAT'"):
            decode_image(data)
    mask = np.zeros((40, 50), np.uint8)
    mask[5:20, 10:30] = 3
    mask_png = encode_png(mask)
    start, _ = _idat(mask_png)
    with pytest.raises(ValueError, match="CRC mismatch"):
        decode_mask(_flipped(mask_png, start + 5, 1))
    assert np.array_equal(decode_image(png), image)  # intact bytes still decode


def test_png_crc_check_edge_cases():
    png = encode_png(_flat_image())
    check_png_crcs(png)
    check_png_crcs(png + b"trailing bytes after IEND are ignored")
    check_png_crcs(b"\xff\xd8 not a PNG: nothing to check")
    with pytest.raises(ValueError, match="truncated PNG"):
        check_png_crcs(png[: len(png) // 2])


def test_a_corrupted_png_cell_is_a_bad_row_not_a_crash():
    image = _flat_image()
    png = encode_png(image)
    start, length = _idat(png)
    bad = next(
        c
        for c in (_flipped(png, start + off, 8) for off in range(length - 8))
        if (a := _pillow_alone(c)) is not None and (a != image).any()
    )
    mask = encode_png(np.zeros(image.shape[:2], np.uint8))
    batch = {
        "id": np.array(["good", "bad"], dtype=object),
        "image": np.array([png, bad], dtype=object),
        "mask": np.array([mask, mask], dtype=object),
    }
    out = decode_train_batch(batch, crop_size=32, scale_range=(1.0, 1.0), flip=False, seed=0,
                             num_classes=4)  # fmt: skip
    assert out["valid"].tolist() == [True, False]


# ----------------------------------------------------------------------------------------------
# Parquet page checksums


def _jpeg(seed: int, h: int = 24, w: int = 32) -> bytes:
    """A noisy JPEG: no checksum of its own, and it decodes whatever its bytes are."""
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _corrupt_cell(shard: str, cell: bytes) -> None:
    """Flip 64 bytes in the middle of `cell` where the shard file stores it."""
    data = Path(shard).read_bytes()
    at = data.find(cell[len(cell) // 2 : len(cell) // 2 + 32])
    assert at > 0, "cell not found verbatim in the shard"
    Path(shard).write_bytes(_flipped(data, at, 64))


def _writer_dataset(root: str, rows: int = 6, row_group_rows: int = 2) -> dict[str, bytes]:
    images = {f"r{i}": _jpeg(i) for i in range(rows)}
    mask = np.zeros((24, 32), np.uint8)
    with ShardWriter(root, "train", row_group_rows=row_group_rows) as w:
        for row_id, data in images.items():
            w.add(row_id, data, encode_png(mask), [0], 24, 32)
    info = DatasetInfo("t", 2, ["a", "b"], [[0, 0, 0], [255, 255, 255]], splits={"train": w.info})
    info.save(root)
    return images


def test_shard_writer_page_checksums_catch_a_flipped_jpeg_cell(tmp_path):
    root = str(tmp_path / "ds")
    images = _writer_dataset(root)
    (shard,) = list_shards(root, "train")
    _corrupt_cell(shard, images["r3"])

    problems: list[str] = []
    table = read_shard_table(root, "train", shard, problems=problems)
    rows = {r["id"]: r for r in table.to_pylist()}
    assert len(rows) == 6  # nothing is dropped: the rows stay, marked bad
    # r3's page fails its checksum; its row group (r2, r3) loses its images, the rest is intact
    assert rows["r2"]["image"] == b"" and rows["r3"]["image"] == b""
    assert all(rows[i]["image"] == images[i] for i in ("r0", "r1", "r4", "r5"))
    assert len(problems) == 1 and "part-00000.parquet: rows 2..3 (row group 1)" in problems[0]
    assert "page checksum mismatch" in problems[0]

    batch = {
        k: np.array(table.column(k).to_pylist(), dtype=object) for k in ("id", "image", "mask")
    }
    out = decode_train_batch(batch, crop_size=16, scale_range=(1.0, 1.0), flip=False, seed=0,
                             num_classes=2)  # fmt: skip
    assert dict(zip(out["id"].tolist(), out["valid"].tolist())) == {
        "r0": True, "r1": True, "r2": False, "r3": False, "r4": True, "r5": True,
    }  # fmt: skip

    found = verify(root, log=lambda m: None)
    assert any("page checksum mismatch" in p and "rows 2..3" in p for p in found)


def test_converted_shards_have_page_checksums_too(tmp_path):
    """The converter's own writer (convert.py), through a folder of JPEGs."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    files = {}
    for split in ("train", "val"):
        for i in range(3):
            os.makedirs(images / split, exist_ok=True)
            os.makedirs(masks / split, exist_ok=True)
            files[(split, f"x{i}")] = _jpeg(10 * i + len(split))
            (images / split / f"x{i}.jpg").write_bytes(files[(split, f"x{i}")])
            Image.fromarray(np.full((24, 32), i % 2, np.uint8)).save(masks / split / f"x{i}.png")
    (tmp_path / "classes.txt").write_text("bg\nthing\n")
    out = str(tmp_path / "out")
    source = FolderSource(str(images), str(masks), str(tmp_path / "classes.txt"))
    assert convert(source, out, workers=1).ok
    assert verify(out, log=lambda m: None) == []
    (shard,) = list_shards(out, "val")
    _corrupt_cell(shard, files[("val", "x1")])
    problems: list[str] = []
    table = read_split_table(out, "val", problems=problems)
    assert table.num_rows == 3 and set(table.column("image").to_pylist()) == {b""}
    assert problems and "page checksum mismatch" in problems[0]
    assert any("page checksum mismatch" in p for p in verify(out, log=lambda m: None))


def test_a_corrupted_id_page_names_the_shard(tmp_path):
    root = str(tmp_path / "ds")
    _writer_dataset(root, rows=3, row_group_rows=3)
    (shard,) = list_shards(root, "train")
    data = Path(shard).read_bytes()
    at = data.find(b"r1")
    assert at > 0
    Path(shard).write_bytes(_flipped(data, at, 1))
    with pytest.raises(DatasetError, match=r"part-00000.parquet: corrupted \(column 'id'"):
        read_split_table(root, "train")
    (problem,) = [p for p in verify(root, log=lambda m: None) if "corrupted" in p]
    assert "column 'id'" in problem


def test_shards_without_checksums_still_read(tmp_path):
    """Datasets written before page checksums existed keep working."""
    root = tmp_path / "old"
    (root / "train").mkdir(parents=True)
    table = pa.table({"id": ["a"], "image": [_jpeg(0)]})
    pq.write_table(table, root / "train" / "part-00000.parquet")
    assert read_split_table(str(root), "train").equals(table)


@pytest.mark.slow
def test_streamed_training_rows_verify_page_checksums(ray_session, tmp_path):
    """The streamed path (not cached in the object store) reads through `read_shard_table` too:
    the corrupted JPEG's row group arrives as bad rows, every other row intact."""
    from components.config import DataConfig
    from components.data.ingest import train_dataset

    root = str(tmp_path / "ds")
    images = _writer_dataset(root)
    (shard,) = list_shards(root, "train")
    _corrupt_cell(shard, images["r3"])
    info = DatasetInfo.load(root)
    data = DataConfig(root=root, crop_size=16, cache_encoded=False)
    batches = list(train_dataset(data, info).iter_batches(batch_size=None))
    valid = np.concatenate([b["valid"] for b in batches])
    assert len(valid) == 6 and int((~valid).sum()) == 2  # r2, r3 (one row group)
