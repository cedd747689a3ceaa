import io
import json
import os
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from components.data import images, shards
from components.data.shards import (
    SHARD_SCHEMA,
    DatasetError,
    DatasetInfo,
    ShardWriter,
    SplitInfo,
    decode_image,
    decode_mask,
    encode_png,
    list_shards,
    mask_labels,
    read_split_table,
    resolve_fs,
)


def _rng_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
# Codecs


def test_png_round_trip_is_pixel_exact():
    rng = np.random.default_rng(0)
    image = _rng_image(rng, 7, 11)
    mask = rng.integers(0, 256, size=(7, 11), dtype=np.uint8)
    assert np.array_equal(decode_image(encode_png(image)), image)
    assert np.array_equal(decode_mask(encode_png(mask)), mask)


def test_encode_png_rejects_wrong_arrays():
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4, 4), np.uint8))


def test_palette_mask_decodes_to_indices_not_colours():
    indices = np.array([[0, 1, 2], [2, 255, 1]], np.uint8)
    img = Image.fromarray(indices, mode="P")
    pal = [0] * 768
    pal[3:9] = [128, 0, 0, 0, 128, 0]  # VOC-like colours for indices 1 and 2
    pal[765:768] = [224, 224, 192]
    img.putpalette(pal)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    assert np.array_equal(decode_mask(buf.getvalue()), indices)
    # the same bytes read as an image give the palette colours
    assert decode_image(buf.getvalue())[0, 1].tolist() == [128, 0, 0]


def test_grey_and_rgba_images_become_rgb():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = decode_image(encode_png(grey))
    assert out.shape == (3, 4, 3) and np.array_equal(out[..., 1], grey)
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    buf = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buf, format="PNG")
    out = decode_image(buf.getvalue())
    assert out.shape == (2, 2, 3) and (out[..., 0] == 200).all()


def test_jpeg_decodes_to_rgb_with_the_right_shape():
    buf = io.BytesIO()
    Image.fromarray(_rng_image(np.random.default_rng(1), 9, 13)).save(buf, format="JPEG")
    out = decode_image(buf.getvalue())
    assert out.shape == (9, 13, 3) and out.dtype == np.uint8


def test_garbage_bytes_raise_value_error():
    with pytest.raises(ValueError):
        decode_image(b"this is not an image")
    with pytest.raises(ValueError):
        decode_mask(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match="single-channel"):
        decode_mask(encode_png(np.zeros((2, 2, 3), np.uint8)))


def test_shards_re_exports_the_codecs_of_images():
    for name in images.__all__:
        assert getattr(shards, name) is getattr(images, name), name
        assert name in shards.__all__, name


def test_mask_labels_matches_unique_without_ignore():
    rng = np.random.default_rng(2)
    mask = rng.choice(np.array([0, 3, 7, 255], np.uint8), size=(20, 30))
    expected = [int(v) for v in np.unique(mask) if v != 255]
    assert mask_labels(mask) == expected == [0, 3, 7]
    assert mask_labels(mask, ignore_index=3) == [0, 7, 255]
    assert mask_labels(np.full((3, 3), 255, np.uint8)) == []


# ----------------------------------------------------------------------------------------------
# Writer and reader


def _rows(n: int, size: int = 8, seed: int = 0) -> list[tuple]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        h, w = size + i % 3, size + 2 * (i % 2)
        mask = rng.integers(0, 3, size=(h, w), dtype=np.uint8)
        mask[0, 0] = 255
        labeled = i % 4 != 3
        rows.append(
            (
                f"row-{i:03d}",
                encode_png(_rng_image(rng, h, w)),
                encode_png(mask) if labeled else None,
                mask_labels(mask) if labeled else [],
                h,
                w,
            )
        )
    return rows


def test_writer_rows_round_trip_with_exact_schema(tmp_path):
    rows = _rows(6)
    with ShardWriter(str(tmp_path), "train") as w:
        for row in rows:
            w.add(*row)
    info = w.close()
    assert info == SplitInfo(rows=6, shards=["part-00000.parquet"], max_height=10, max_width=10)
    table = pq.read_table(tmp_path / "train" / "part-00000.parquet")
    assert table.schema.equals(SHARD_SCHEMA)
    assert [tuple(r.values()) for r in table.to_pylist()] == rows
    assert read_split_table(str(tmp_path), "train", columns=["id"]).column_names == ["id"]


def test_writer_rolls_shards_over_and_leaves_no_temp_files(tmp_path):
    rows = _rows(20)
    per_row = len(rows[0][1]) + len(rows[0][2])
    with ShardWriter(str(tmp_path), "val", target_shard_bytes=3 * per_row, row_group_rows=2) as w:
        for row in rows:
            w.add(*row)
    info = w.close()
    shards = list_shards(str(tmp_path), "val")
    assert len(shards) >= 3 and [os.path.basename(s) for s in shards] == info.shards
    counts = [pq.ParquetFile(s).metadata.num_rows for s in shards]
    assert sum(counts) == info.rows == 20
    assert pq.ParquetFile(shards[0]).metadata.num_row_groups == (counts[0] + 1) // 2
    assert not [n for n in os.listdir(tmp_path / "val") if n.endswith(".tmp")]
    table = read_split_table(str(tmp_path), "val")
    assert table.column("id").to_pylist() == [r[0] for r in rows]


def test_crash_inside_writer_leaves_no_partial_shard_or_manifest(tmp_path):
    rows = _rows(5)
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(str(tmp_path), "train") as w:
        for row in rows:
            w.add(*row)
        raise RuntimeError("boom")
    assert os.listdir(tmp_path / "train") == []
    assert not (tmp_path / "dataset.json").exists()
    with pytest.raises(DatasetError, match="no part-"):
        list_shards(str(tmp_path), "train")


def test_reopening_a_split_replaces_its_old_shards(tmp_path):
    for n in (8, 3):
        with ShardWriter(str(tmp_path), "train", target_shard_bytes=1) as w:
            for row in _rows(n):
                w.add(*row)
    assert len(list_shards(str(tmp_path), "train")) == 3


def test_duplicate_id_is_rejected(tmp_path):
    row = _rows(1)[0]
    with ShardWriter(str(tmp_path), "train") as w:
        w.add(*row)
        with pytest.raises(ValueError, match="duplicate id 'row-000'"):
            w.add(*row)
        with pytest.raises(ValueError, match="row 'empty': image must be"):
            w.add("empty", b"", None, [], 4, 4)
    assert w.close().rows == 1


def test_list_shards_names_missing_or_empty_folder(tmp_path):
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "nope"))):
        list_shards(str(tmp_path), "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".part-00000.parquet.tmp").write_bytes(b"half")
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "empty"))):
        list_shards(str(tmp_path), "empty")


def test_file_uri_roots_work_like_local_paths(tmp_path):
    uri = f"file://{tmp_path}"
    assert resolve_fs(uri)[1] == str(tmp_path)
    with ShardWriter(uri, "train") as w:
        w.add(*_rows(1)[0])
    assert list_shards(uri, "train") == [f"{uri}/train/part-00000.parquet"]
    assert read_split_table(uri, "train").num_rows == 1


# ----------------------------------------------------------------------------------------------
# Manifest


def _info() -> DatasetInfo:
    return DatasetInfo(
        name="toy",
        num_classes=3,
        class_names=["bg", "a", "b"],
        palette=[[0, 0, 0], [255, 0, 0], [0, 255, 0]],
        splits={"train": SplitInfo(4, ["part-00000.parquet"], 10, 12)},
    )


def test_dataset_info_save_load_round_trip(tmp_path):
    _info().save(str(tmp_path))
    assert DatasetInfo.load(str(tmp_path)) == _info()
    assert os.listdir(tmp_path) == ["dataset.json"]  # no temp file left behind


def _write_json(tmp_path, data) -> str:
    path = tmp_path / "dataset.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_dataset_info_errors_name_the_file_and_field(tmp_path):
    with pytest.raises(DatasetError, match="dataset.json: not found"):
        DatasetInfo.load(str(tmp_path))
    path = _write_json(tmp_path, "{not json")
    with pytest.raises(DatasetError, match=re.escape(f"{path}: not valid JSON")):
        DatasetInfo.load(str(tmp_path))
    good = json.loads(_info().to_json())
    missing = {k: v for k, v in good.items() if k != "class_names"}
    _write_json(tmp_path, missing)
    with pytest.raises(DatasetError, match=re.escape(f"{path}: missing field 'class_names'")):
        DatasetInfo.load(str(tmp_path))
    _write_json(tmp_path, {**good, "class_names": ["bg", "a"]})
    with pytest.raises(DatasetError, match=re.escape(f"{path}: field 'class_names' has 2 entries")):
        DatasetInfo.load(str(tmp_path))
    del good["splits"]["train"]["rows"]
    _write_json(tmp_path, good)
    with pytest.raises(DatasetError, match="missing field 'splits.train.rows'"):
        DatasetInfo.load(str(tmp_path))
