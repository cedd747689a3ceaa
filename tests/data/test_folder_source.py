"""`prepare_data.py folder`: your own images + masks folders, both layouts (train/ and val/
subfolders, or split lists), palette and greyscale masks, the classes/palette file formats, and
every user mistake named with its file (and line)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from components.data.shards import DatasetError, DatasetInfo, decode_mask, read_split_table
from components.data.sources.common import voc_colormap
from components.data.sources.folder import (
    check_id,
    parse_split_lists,
    read_classes,
    read_palette,
)
from components.data.verify import verify
from pipelines import prepare_data

PALETTE = [(0, 0, 0), (10, 200, 30), (250, 0, 120)]


def _image(path, seed: int, fmt: str, h: int = 12, w: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


def _mask(path, values: np.ndarray, palette: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette:  # indices are the class ids, as VOC ships them
        img = Image.frombytes("P", (values.shape[1], values.shape[0]), values.tobytes())
        img.putpalette([v for c in PALETTE for v in c] + [255, 255, 255] * 253)
    else:  # grey value = class id
        img = Image.fromarray(values)
    img.save(path, format="PNG")


def _values(seed: int, h: int = 12, w: int = 16, classes: int = 3) -> np.ndarray:
    values = np.random.default_rng(seed).integers(0, classes, (h, w)).astype(np.uint8)
    values[0, :3] = 255  # ignore
    return values


def _train_val(root, palette: bool = True) -> dict[tuple[str, str], np.ndarray]:
    """images/{train,val}/... in JPEG, PNG and WebP, nested; masks mirror them."""
    files = {("train", "a/x1"): "JPEG", ("train", "a/b/x2"): "PNG", ("train", "x3"): "WEBP",
             ("val", "y1"): "JPEG"}  # fmt: skip
    masks = {}
    for k, ((split, stem), fmt) in enumerate(files.items()):
        ext = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}[fmt]
        _image(root / "images" / split / f"{stem}{ext}", k, fmt)
        masks[(split, stem)] = _values(k)
        _mask(root / "masks" / split / f"{stem}.png", masks[(split, stem)], palette)
    (root / "classes.txt").write_text("background\ncat\ndog\n")
    return masks


def _args(root, out, *extra) -> list[str]:
    return ["folder", "--images", str(root / "images"), "--masks", str(root / "masks"),
            "--classes", str(root / "classes.txt"), "--out", str(out), "--workers", "1",
            *extra]  # fmt: skip


def test_train_val_subfolders_with_palette_masks(tmp_path):
    masks = _train_val(tmp_path)
    out = tmp_path / "data" / "pets"
    assert prepare_data.main([*_args(tmp_path, out), "--verify"]) == 0
    info = DatasetInfo.load(str(out))
    assert info.name == "pets" and info.class_names == ["background", "cat", "dog"]
    assert [tuple(c) for c in info.palette] == PALETTE  # the masks' own palette
    assert {k: v.rows for k, v in info.splits.items()} == {"train": 3, "val": 1}
    for split in ("train", "val"):
        for row in read_split_table(str(out), split).to_pylist():
            expected = masks[(split, row["id"])]
            assert np.array_equal(decode_mask(row["mask"]), expected)
            assert row["image_labels"] == sorted(set(np.unique(expected).tolist()) - {255})
    ids = read_split_table(str(out), "train").column("id").to_pylist()
    assert sorted(ids) == ["a/b/x2", "a/x1", "x3"]  # relative to images/train/


def test_split_lists_greyscale_masks_and_yaml_classes(tmp_path):
    for k, stem in enumerate(["s1/p", "s1/q", "s2/r", "s2/t"]):
        _image(tmp_path / "images" / f"{stem}.jpg", k, "JPEG")
        _mask(tmp_path / "masks" / f"{stem}.png", _values(k), palette=False)
    (tmp_path / "classes.yaml").write_text("{0: background, 2: dog, 1: cat}\n")
    (tmp_path / "train.txt").write_text("s1/p\ns1/q.jpg\n\n# a comment\ns2/r\ns1/p\n")
    (tmp_path / "val.txt").write_text("s2/t\n")
    out = tmp_path / "out"
    args = _args(tmp_path, out, "--splits", f"train={tmp_path}/train.txt,val={tmp_path}/val.txt")
    args[args.index("--classes") + 1] = str(tmp_path / "classes.yaml")
    assert prepare_data.main(args) == 0
    info = DatasetInfo.load(str(out))
    assert info.class_names == ["background", "cat", "dog"]
    assert info.palette == voc_colormap(3)  # greyscale masks: generated distinct colours
    ids = read_split_table(str(out), "train").column("id").to_pylist()
    assert sorted(ids) == ["s1/p", "s1/q", "s2/r"]  # a repeated line is one row
    assert verify(str(out), log=lambda m: None) == []
    record = json.loads((out / "_progress" / "conversion.json").read_text())
    assert record["splits"] == {"train": f"{tmp_path}/train.txt", "val": f"{tmp_path}/val.txt"}


def test_palette_file_overrides_and_is_checked(tmp_path):
    _train_val(tmp_path)
    (tmp_path / "palette.txt").write_text("1,2,3\n4 5 6\n# comment\n7,8,9\n10,11,12\n")
    out = tmp_path / "out"
    assert (
        prepare_data.main([*_args(tmp_path, out), "--palette", str(tmp_path / "palette.txt")]) == 0
    )
    assert DatasetInfo.load(str(out)).palette == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    (tmp_path / "p.yaml").write_text("[[1, 2, 3], [4, 5, 6], [7, 8, 9]]\n")
    assert read_palette(str(tmp_path / "p.yaml"), 3) == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    (tmp_path / "short.txt").write_text("1,2,3\n")
    with pytest.raises(DatasetError, match="short.txt: 1 colours for 3 classes"):
        read_palette(str(tmp_path / "short.txt"), 3)
    (tmp_path / "bad.txt").write_text("1,2,3\n1,2,300\n")
    with pytest.raises(DatasetError, match=r"bad.txt line 2: expected R,G,B"):
        read_palette(str(tmp_path / "bad.txt"), 2)


def test_without_splits_or_subfolders_asks_for_splits(tmp_path, capsys):
    _image(tmp_path / "images" / "x.jpg", 0, "JPEG")
    _mask(tmp_path / "masks" / "x.png", _values(0), palette=False)
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    assert prepare_data.main(_args(tmp_path, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/images: no train/ and val/ subfolders" in err and "--splits train=" in err


@pytest.mark.parametrize(
    ("line", "why"),
    [("../../etc/passwd", "climbs out of the folder"), ("a/../../x", "climbs out"),
     ("/etc/passwd", "is an absolute path"), ("C:\\data\\x", "is an absolute path")],
)  # fmt: skip
def test_split_list_ids_never_leave_their_folder(tmp_path, capsys, line, why):
    _train_val(tmp_path)
    (tmp_path / "train.txt").write_text(f"train/a/x1\n{line}\n")
    args = _args(tmp_path, tmp_path / "out", "--splits", f"train={tmp_path}/train.txt")
    assert prepare_data.main(args) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/train.txt line 2: '{line}' {why}" in err
    assert not (tmp_path / "out").exists()


def test_bad_items_are_named_mask_missing_id_unknown_ids_beyond_classes(tmp_path, capsys):
    masks = _train_val(tmp_path, palette=False)
    (tmp_path / "masks" / "train" / "x3.png").unlink()  # an image without its mask
    beyond = masks[("train", "a/x1")].copy()
    beyond[5, 5] = 7  # class 7 of 3
    _mask(tmp_path / "masks" / "train" / "a" / "x1.png", beyond, palette=False)
    out = tmp_path / "out"
    assert prepare_data.main(_args(tmp_path, out)) == 1
    err = capsys.readouterr().err
    assert f"train/x3: no mask for image {tmp_path}/images/train/x3.webp (expected " in err
    assert f"{tmp_path}/masks/train/x3.png)" in err
    assert (
        f"train/a/x1: mask {tmp_path}/masks/train/a/x1.png has class ids [7] but "
        f"{tmp_path}/classes.txt lists 3 classes (ids 0..2; 255 = ignore)" in err
    )
    assert not (out / "dataset.json").exists()

    _image(tmp_path / "images" / "val" / "lonely.png", 9, "PNG")  # listed, has no mask
    (tmp_path / "val.txt").write_text("y1\nnot/there\nlonely\n")
    args = _args(tmp_path, tmp_path / "out2", "--splits", f"val={tmp_path}/val.txt")
    args[args.index("--images") + 1] = str(tmp_path / "images" / "val")
    args[args.index("--masks") + 1] = str(tmp_path / "masks" / "val")
    assert prepare_data.main(args) == 1
    err = capsys.readouterr().err
    assert f"val/not/there: {tmp_path}/val.txt line 2: no image" in err
    assert f"val/lonely: no mask for image {tmp_path}/images/val/lonely.png" in err


def test_rgb_masks_get_a_hint(tmp_path, capsys):
    _train_val(tmp_path)
    Image.new("RGB", (16, 12), (10, 200, 30)).save(tmp_path / "masks" / "val" / "y1.png")
    assert prepare_data.main([*_args(tmp_path, tmp_path / "out"), "--max-bad-fraction", "1"]) == 1
    assert "colour masks are not read" in capsys.readouterr().err  # val is empty: exit 1


def test_a_corrupted_png_file_is_a_bad_item(tmp_path, capsys):
    """Conversion decodes every file with the PNG CRC check: a file corrupted on disk whose
    pixels Pillow alone would decode quietly is skipped and named."""
    masks = _train_val(tmp_path)
    path = tmp_path / "masks" / "train" / "x3.png"
    data = bytearray(path.read_bytes())
    at = data.find(b"IDAT") + 4
    for off in range(int.from_bytes(data[at - 8 : at - 4], "big")):
        trial = bytearray(data)
        trial[at + off] ^= 0x01
        try:
            quiet = np.asarray(Image.open(io.BytesIO(bytes(trial))))
        except (OSError, ValueError, SyntaxError):
            continue
        if not np.array_equal(quiet, masks[("train", "x3")]):
            break
    else:
        pytest.fail("the fixture no longer shows the hazard (no quiet corruption): pick another")
    path.write_bytes(bytes(trial))
    assert prepare_data.main(_args(tmp_path, tmp_path / "out")) == 1
    assert "CRC mismatch in chunk b'IDAT'" in capsys.readouterr().err


def test_classes_file_mistakes(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("")
    with pytest.raises(DatasetError, match="classes.txt: no class names"):
        read_classes(str(path))
    path.write_text("bg\n\ncat\n")
    with pytest.raises(DatasetError, match="classes.txt line 2: blank"):
        read_classes(str(path))
    path.write_text("bg\ncat\ncat\n\n")
    with pytest.raises(DatasetError, match=r"class 'cat' is listed twice \(ids 1, 2\)"):
        read_classes(str(path))
    path.write_text("bg\ncat\n\n\n")
    assert read_classes(str(path)) == ["bg", "cat"]  # trailing blank lines are fine
    yml = tmp_path / "c.yaml"
    yml.write_text("- bg\n- cat\n")
    assert read_classes(str(yml)) == ["bg", "cat"]
    yml.write_text("{0: bg, 2: dog}\n")
    with pytest.raises(DatasetError, match=r"c.yaml: class ids must be 0..1; missing \[1\]"):
        read_classes(str(yml))
    yml.write_text("[unclosed\n")
    with pytest.raises(DatasetError, match="c.yaml: not valid YAML"):
        read_classes(str(yml))
    with pytest.raises(DatasetError, match="nope.txt: missing classes file"):
        read_classes(str(tmp_path / "nope.txt"))


def test_empty_classes_file_fails_the_command(tmp_path, capsys):
    _train_val(tmp_path)
    (tmp_path / "classes.txt").write_text("\n")
    assert prepare_data.main(_args(tmp_path, tmp_path / "out")) == 2
    assert f"{tmp_path}/classes.txt: no class names" in capsys.readouterr().err


def test_split_spec_and_ids():
    assert parse_split_lists("train=a.txt, val=b.txt") == {"train": "a.txt", "val": "b.txt"}
    for bad, why in (("train", "is not NAME=FILE"), ("../x=a.txt", "split name '../x'"),
                     ("t=a,t=b", "given twice"), ("", "no split given")):  # fmt: skip
        with pytest.raises(DatasetError, match=why):
            parse_split_lists(bad)
    assert check_id(" a/b.JPG ", "f line 1") == "a/b"
    assert check_id("./a//b", "f line 1") == "a/b"
    assert check_id("a/b.tar", "f line 1") == "a/b.tar"  # not an image extension: part of the id
