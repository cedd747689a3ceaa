"""`prepare_data.py --out` never replaces another dataset by accident: a folder is written into
only when it is empty or holds the same conversion (to resume it); `--overwrite` replaces a
dataset but removes only the files a conversion writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from components.data.shards import DatasetInfo
from pipelines import prepare_data


def _voc(root) -> str:
    """A three-image VOC2012 in its distributed layout: train 2, val 1."""
    base = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for k, i in enumerate(["2007_000032", "2007_000039", "2007_000033"]):
        pixels = np.random.default_rng(k).integers(0, 255, (10, 14, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(base / "JPEGImages" / f"{i}.jpg")
        Image.fromarray(np.full((10, 14), k + 1, np.uint8)).save(
            base / "SegmentationClass" / f"{i}.png"
        )
    (base / "ImageSets/Segmentation/train.txt").write_text("2007_000032\n2007_000039\n")
    (base / "ImageSets/Segmentation/val.txt").write_text("2007_000033\n")
    return str(root)


def _synthetic(out) -> list[str]:
    return ["synthetic", "--out", str(out), "--num-train", "4", "--num-val", "2", "--size", "32"]


def _voc_args(root, out, *extra) -> list[str]:
    return ["voc", "--root", root, "--out", str(out), "--workers", "1", *extra]


def _tree(folder) -> dict[str, bytes]:
    """Every file below `folder` with its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()
    }


def test_a_conversion_refuses_a_folder_holding_another_dataset(tmp_path, capsys):
    out = tmp_path / "out"
    assert prepare_data.main(_synthetic(out)) == 0
    before = _tree(out)
    voc = _voc(tmp_path / "voc")
    assert prepare_data.main(_voc_args(voc, out)) == 2
    err = capsys.readouterr().err
    assert f"{out}: holds the dataset 'synthetic' (dataset.json)" in err
    assert "--overwrite" in err and "another --out" in err
    assert _tree(out) == before  # untouched

    assert prepare_data.main(_voc_args(voc, out, "--overwrite")) == 0
    assert DatasetInfo.load(str(out)).name == "voc"
    assert sorted(os.listdir(out)) == ["_progress", "dataset.json", "train", "val"]
    assert not any(name.startswith("synthetic") for name in _tree(out))  # no old shard left
    assert sorted(os.listdir(out / "train")) == ["part-00000.parquet"]


def test_the_same_conversion_resumes_and_a_different_one_is_refused(tmp_path, capsys):
    voc, out = _voc(tmp_path / "voc"), tmp_path / "out"
    assert prepare_data.main(_voc_args(voc, out)) == 0
    (out / "dataset.json").unlink()  # as after an interruption
    assert prepare_data.main(_voc_args(voc, out, "--shard-rows", "7")) == 0  # same conversion
    assert "shards written" in capsys.readouterr().out

    other = _voc(tmp_path / "other-voc")
    assert prepare_data.main(_voc_args(other, out)) == 2
    err = capsys.readouterr().err
    assert f"holds the dataset 'voc' (dataset.json) and a conversion of voc from root {voc}" in err

    # Another labeled subset of the same root would replace this one: refused as well.
    assert prepare_data.main(_voc_args(voc, out, "--labeled", "1")) == 2
    assert "refusing to replace it" in capsys.readouterr().err


def test_an_unfinished_conversion_is_described_as_such(tmp_path, capsys):
    voc, out = _voc(tmp_path / "voc"), tmp_path / "out"
    assert prepare_data.main(_voc_args(voc, out)) == 0
    (out / "dataset.json").unlink()
    assert prepare_data.main(_synthetic(out)) == 2
    err = capsys.readouterr().err
    assert f"a conversion of voc from root {voc}, unfinished (no dataset.json)" in err
    assert "not a synthetic dataset" in err


def test_overwrite_never_removes_files_the_project_did_not_write(tmp_path, capsys):
    voc, out = _voc(tmp_path / "voc"), tmp_path / "out"
    assert prepare_data.main(_synthetic(out)) == 0
    (out / "train" / "notes.txt").write_text("mine")
    before = _tree(out)
    assert prepare_data.main(_voc_args(voc, out, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "holds files this project does not write (e.g. 'train/notes.txt')" in err
    assert _tree(out) == before
    assert prepare_data.main([*_synthetic(out), "--overwrite"]) == 2
    assert _tree(out) == before


def test_a_folder_of_other_files_is_refused(tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"x")
    assert prepare_data.main(_voc_args(_voc(tmp_path / "voc"), out)) == 2
    assert "holds other files (e.g. 'holiday.jpg')" in capsys.readouterr().err
    assert prepare_data.main(_synthetic(out)) == 2  # used to end in a traceback
    assert "holds other files (e.g. 'holiday.jpg')" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["holiday.jpg"]


def test_synthetic_keeps_its_own_dataset_and_overwrites_on_request(tmp_path, capsys):
    out = tmp_path / "syn"
    assert prepare_data.main(_synthetic(out)) == 0
    before = _tree(out)
    assert prepare_data.main(_synthetic(out)) == 0  # complete: left as it is
    assert _tree(out) == before

    voc = _voc(tmp_path / "voc")
    assert prepare_data.main(_voc_args(voc, tmp_path / "v")) == 0
    assert prepare_data.main(_synthetic(tmp_path / "v")) == 2
    assert "holds the dataset 'voc'" in capsys.readouterr().err
    assert prepare_data.main([*_synthetic(tmp_path / "v"), "--overwrite"]) == 0
    info = DatasetInfo.load(str(tmp_path / "v"))
    assert info.name == "synthetic" and sorted(info.splits) == ["train", "val"]
    assert sorted(os.listdir(tmp_path / "v")) == ["dataset.json", "train", "val"]  # no _progress


def test_the_conversion_record_says_what_was_converted(tmp_path):
    voc, out = _voc(tmp_path / "voc"), tmp_path / "out"
    assert prepare_data.main(_voc_args(voc, out, "--labeled", "1", "--seed", "3")) == 0
    record = json.loads((out / "_progress" / "conversion.json").read_text())
    assert record == {
        "dataset": "voc",
        "root": voc,
        "options": {"labeled": "1", "labeled_from": "train", "seed": 3},
    }
