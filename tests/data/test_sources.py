"""Real-dataset converters on tiny fixtures built in each dataset's real on-disk layout (real
PNG/JPEG encodings, file-name patterns and list files). References are written out here by
hand: the published Cityscapes trainId table and colours, the VOC palette, COCO's RLE format."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from components.data.convert import convert, labeled_subset
from components.data.shards import (
    DatasetError,
    DatasetInfo,
    decode_mask,
    read_split_table,
)
from components.data.sources import ADE20K, COCO, VOC, Cityscapes
from components.data.sources.coco import rle_decode
from components.data.verify import verify
from pipelines import prepare_data

# cityscapesScripts labels.py: labelId -> trainId for the 19 evaluated classes.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
                        23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip
CITYSCAPES_COLOURS = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
]  # fmt: skip
# The VOC2012 devkit's colour map for classes 0..20.
VOC_PALETTE = [
    (0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128),
    (0, 128, 128), (128, 128, 128), (64, 0, 0), (192, 0, 0), (64, 128, 0), (192, 128, 0),
    (64, 0, 128), (192, 0, 128), (64, 128, 128), (192, 128, 128), (0, 64, 0), (128, 64, 0),
    (0, 192, 0), (128, 192, 0), (0, 64, 128),
]  # fmt: skip


def _png(array: np.ndarray, path, palette: list | None = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if palette is None:
        img = Image.fromarray(array)
    else:  # a palette PNG whose indices are the array's values, as VOC ships them
        img = Image.frombytes("P", (array.shape[1], array.shape[0]), array.tobytes())
        img.putpalette([v for colour in palette for v in colour] + [224, 224, 192] * 235)
    img.save(path, format="PNG")


def _jpeg(array: np.ndarray, path) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, format="JPEG", quality=90)


def _rng_image(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _rows(root, split) -> dict[str, dict]:
    return {r["id"]: r for r in read_split_table(str(root), split).to_pylist()}


# ----------------------------------------------------------------------------------------------
# Cityscapes


def _cityscapes(root, bad_size: bool = False):
    """2 train + 1 val image in leftImg8bit/ and gtFine/; labelIds from all over 0..33."""
    label_maps = {}
    for split, names in {"train": [("aachen", "000000_000019"), ("bochum", "000001_000020")],
                         "val": [("frankfurt", "000000_000294")]}.items():  # fmt: skip
        for k, (city, frame) in enumerate(names):
            stem = f"{city}_{frame}"
            h, w = 12, 20
            image = _rng_image(k + len(split), h, w)
            labels = np.random.default_rng(k).integers(0, 34, (h, w)).astype(np.uint8)
            _png(image, root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            if bad_size and split == "train" and k == 1:
                labels = labels[:6]
            _png(labels, root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
            label_maps[f"{city}/{stem}"] = labels
    return label_maps


def test_cityscapes_round_trip_and_official_tables(tmp_path):
    labels = _cityscapes(tmp_path / "cs")
    out = tmp_path / "out"
    report = convert(Cityscapes(str(tmp_path / "cs")), str(out), workers=2, shard_rows=1)
    assert report.ok and report.rows == {"train": 2, "val": 1} and not report.bad

    info = DatasetInfo.load(str(out))
    assert info.num_classes == 19 and info.class_names[13] == "car"
    assert [tuple(c) for c in info.palette] == CITYSCAPES_COLOURS
    for split in ("train", "val"):
        for row_id, row in _rows(out, split).items():
            city, stem = row_id.split("/")
            image_file = tmp_path / "cs" / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
            assert row["image"] == image_file.read_bytes()  # the file as distributed
            expected = np.vectorize(lambda v: CITYSCAPES_TRAIN_IDS.get(int(v), 255))(
                labels[row_id]
            ).astype(np.uint8)
            mask = decode_mask(row["mask"])
            assert np.array_equal(mask, expected)
            assert row["image_labels"] == sorted(set(np.unique(expected).tolist()) - {255})
            assert (row["height"], row["width"]) == (12, 20)
    assert verify(str(out), log=lambda m: None) == []


def test_cityscapes_bad_pair_reported_and_fraction_enforced(tmp_path, capsys):
    _cityscapes(tmp_path / "cs", bad_size=True)
    args = ["cityscapes", "--root", str(tmp_path / "cs"), "--out", str(tmp_path / "out"),
            "--workers", "1"]  # fmt: skip
    assert prepare_data.main(args) == 1  # 1 of 3 bad > default 0
    err = capsys.readouterr().err
    assert (
        "train/bochum/bochum_000001_000020: mask" in err and "is 6x20 but its image is 12x20" in err
    )
    assert not (tmp_path / "out" / "dataset.json").exists()
    assert prepare_data.main([*args, "--max-bad-fraction", "0.5", "--verify"]) == 0
    info = DatasetInfo.load(str(tmp_path / "out"))
    assert info.splits["train"].rows == 1 and info.splits["val"].rows == 1


def test_cityscapes_missing_folder_named(tmp_path, capsys):
    _cityscapes(tmp_path / "cs")
    import shutil

    shutil.rmtree(tmp_path / "cs" / "gtFine" / "val")
    assert prepare_data.main(["cityscapes", "--root", str(tmp_path / "cs"), "--out",
                              str(tmp_path / "out")]) == 2  # fmt: skip
    assert f"{tmp_path}/cs/gtFine/val: missing folder" in capsys.readouterr().err


def test_conversion_resumes_and_never_looks_complete_early(tmp_path):
    _cityscapes(tmp_path / "cs")
    source, out = Cityscapes(str(tmp_path / "cs")), tmp_path / "out"
    first = convert(source, str(out), workers=1, shard_rows=1)
    assert first.written_chunks == 3
    before = _rows(out, "train")

    # An interruption after one shard of a rerun: its record is gone, the manifest too.
    (out / "_progress" / "train" / "part-00001.parquet.json").unlink()
    (out / "train" / "part-00001.parquet").unlink()
    (out / "dataset.json").unlink()
    with pytest.raises(DatasetError, match="dataset.json: not found"):
        DatasetInfo.load(str(out))
    again = convert(source, str(out), workers=1, shard_rows=1)
    assert (again.written_chunks, again.skipped_chunks) == (1, 2)
    assert _rows(out, "train") == before

    # A file that breaks between runs: its chunk is redone, and a chunk left with no usable
    # rows must not keep its earlier shard (readers take every part-*.parquet).
    broken = tmp_path / "cs" / "leftImg8bit" / "val" / "frankfurt"
    (broken / "frankfurt_000000_000294_leftImg8bit.png").write_bytes(b"not a png")
    (out / "_progress" / "val" / "part-00000.parquet.json").unlink()
    partial = convert(source, str(out), workers=1, shard_rows=1)
    assert not partial.ok and not (out / "val" / "part-00000.parquet").exists()
    assert not (out / "dataset.json").exists()
    _cityscapes(tmp_path / "cs")  # repaired
    assert convert(source, str(out), workers=1, shard_rows=1).ok

    # Other shard sizes: train's chunk differs (val's single item does not), and the stale
    # higher-numbered train shard is removed.
    third = convert(source, str(out), workers=1, shard_rows=2)
    assert (third.written_chunks, third.skipped_chunks) == (1, 1)
    assert sorted(p.name for p in (out / "train").iterdir()) == ["part-00000.parquet"]
    assert _rows(out, "train") == before


# ----------------------------------------------------------------------------------------------
# Pascal VOC (+ SBD augmented)


def _voc(root, extra_label: int | None = None):
    base = root / "VOCdevkit" / "VOC2012"
    masks = {}
    ids = {"train": ["2007_000032", "2007_000039"], "val": ["2007_000033"]}
    for k, i in enumerate(ids["train"] + ids["val"]):
        h, w = 10, 14
        _jpeg(_rng_image(k, h, w), base / "JPEGImages" / f"{i}.jpg")
        mask = np.zeros((h, w), np.uint8)
        mask[2:6, 3:9] = [1, 15, 20][k]
        mask[2, 3:9] = 255  # object border
        if extra_label is not None and k == 1:
            mask[0, 0] = extra_label
        _png(mask, base / "SegmentationClass" / f"{i}.png", palette=VOC_PALETTE)
        _png(mask, base / "SegmentationClassAug" / f"{i}.png")  # single-channel, as in SBD aug
        masks[i] = mask
    lists = base / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    for split, names in ids.items():
        (lists / f"{split}.txt").write_text("\n".join(names) + "\n")
    aug = [f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png" for i in ids["train"] + ids["val"]]
    (lists / "train_aug.txt").write_text("\n".join(aug) + "\n")
    return masks


def test_voc_palette_pngs_and_augmented_set(tmp_path):
    masks = _voc(tmp_path / "voc")
    out = tmp_path / "out"
    report = convert(VOC(str(tmp_path / "voc")), str(out), workers=1)
    assert report.ok and report.rows == {"train": 2, "val": 1, "train_aug": 3}
    info = DatasetInfo.load(str(out))
    assert [tuple(c) for c in info.palette] == VOC_PALETTE
    assert info.class_names[15] == "person" and info.num_classes == 21
    base = tmp_path / "voc" / "VOCdevkit" / "VOC2012"
    for split in ("train", "val", "train_aug"):
        for row_id, row in _rows(out, split).items():
            assert row["image"] == (base / "JPEGImages" / f"{row_id}.jpg").read_bytes()
            assert np.array_equal(decode_mask(row["mask"]), masks[row_id])  # 255 kept
            assert row["image_labels"] == sorted(set(np.unique(masks[row_id]).tolist()) - {255})
    # The palette PNG stores indices, never colours: the file's own pixels are the class ids.
    raw = np.asarray(Image.open(base / "SegmentationClass" / "2007_000039.png"))
    assert set(np.unique(raw).tolist()) == {0, 15, 255}


def test_voc_missing_list_entry_and_foreign_label_reported(tmp_path):
    _voc(tmp_path / "voc", extra_label=21)
    lists = tmp_path / "voc" / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
    (lists / "val.txt").write_text("2007_000033\n2099_999999\n")
    report = convert(VOC(str(tmp_path / "voc")), str(tmp_path / "out"), workers=1)
    assert not report.ok
    reasons = {(split, i): r for split, i, r in report.bad}
    assert "missing file" in reasons[("val", "2099_999999")]
    assert reasons[("val", "2099_999999")].endswith("JPEGImages/2099_999999.jpg")
    assert "label ids [21] outside the dataset's set" in reasons[("train", "2007_000039")]


# ----------------------------------------------------------------------------------------------
# ADE20K


def _ade20k(root) -> None:
    for split, folder in (("train", "training"), ("val", "validation")):
        ann = np.array([[0, 1, 2, 150], [150, 75, 0, 1]], np.uint8).repeat(4, 0).repeat(3, 1)
        stem = f"ADE_{split}_00000001"
        _jpeg(_rng_image(1, *ann.shape), root / "images" / folder / f"{stem}.jpg")
        _png(ann, root / "annotations" / folder / f"{stem}.png")


def test_ade20k_reduce_zero_label(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    _ade20k(root)
    out = tmp_path / "out"
    report = convert(ADE20K(str(root)), f"file://{out}", workers=1)  # output given as a URI
    assert report.ok and report.rows == {"train": 1, "val": 1}
    info = DatasetInfo.load(f"file://{out}")
    assert info.num_classes == 150 and len(info.class_names) == 150 and len(info.palette) == 150
    assert info.class_names[0] == "wall" and info.class_names[149] == "flag"
    mask = decode_mask(_rows(out, "train")["ADE_train_00000001"]["mask"])
    expected = np.array([[255, 0, 1, 149], [149, 74, 255, 0]], np.uint8).repeat(4, 0).repeat(3, 1)
    assert np.array_equal(mask, expected)


# ----------------------------------------------------------------------------------------------
# COCO


def _rle_counts(mask: np.ndarray) -> list[int]:
    """Column-major run lengths, starting with a run of zeros (COCO's uncompressed RLE)."""
    flat = mask.T.ravel().astype(np.uint8)
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return counts


def _rle_string(counts: list[int]) -> str:
    """COCO's compressed RLE string, written from its format description."""
    out = []
    for i, c in enumerate(counts):
        x = c - counts[i - 2] if i > 2 else c
        more = True
        while more:
            group = x & 0x1F
            x >>= 5
            more = not ((group & 0x10 == 0 and x == 0) or (group & 0x10 and x == -1))
            out.append(chr(group + 48 + (0x20 if more else 0)))
    return "".join(out)


def test_coco_rle_both_forms():
    rng = np.random.default_rng(3)
    mask = rng.random((9, 7)) > 0.6
    counts = _rle_counts(mask)
    assert np.array_equal(rle_decode({"size": [9, 7], "counts": counts}), mask)
    assert np.array_equal(rle_decode({"size": [9, 7], "counts": _rle_string(counts)}), mask)


COCO_H, COCO_W = 8, 10
COCO_CROWD = np.zeros((COCO_H, COCO_W), bool)
COCO_CROWD[5:7, 6:9] = True


def _coco(root) -> None:
    h, w, crowd = COCO_H, COCO_W, COCO_CROWD
    person = [[1.5, 0.5, 5.5, 0.5, 5.5, 3.5, 1.5, 3.5]]  # pixel centres: rows 1-3, cols 2-5
    bottle = np.zeros((h, w), bool)
    bottle[2:3, 3:5] = True  # small, on top of the person
    data = {
        "images": [{"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "height": h,
                    "width": w},
                   {"id": 25, "file_name": "COCO_train2014_000000000025.jpg", "height": h,
                    "width": w}],
        "annotations": [
            {"id": 1, "image_id": 9, "category_id": 1, "iscrowd": 0, "area": 12.0,
             "segmentation": person},
            {"id": 2, "image_id": 9, "category_id": 44, "iscrowd": 0, "area": 2.0,
             "segmentation": {"size": [h, w], "counts": _rle_string(_rle_counts(bottle))}},
            {"id": 3, "image_id": 9, "category_id": 90, "iscrowd": 1, "area": 6.0,
             "segmentation": {"size": [h, w], "counts": _rle_counts(crowd)}},
        ],
        "categories": [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"},
                       {"id": 44, "name": "bottle"}],
    }  # fmt: skip
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        d = dict(data, images=[dict(i, file_name=i["file_name"].replace("train", split))
                               for i in data["images"]])  # fmt: skip
        (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(d))
        for img in d["images"]:
            _jpeg(_rng_image(img["id"], h, w), root / f"{split}2014" / img["file_name"])


def test_coco_instances_to_masks(tmp_path):
    root, (h, w), crowd = tmp_path / "coco", (COCO_H, COCO_W), COCO_CROWD
    _coco(root)
    out = tmp_path / "out"
    report = convert(COCO(str(root)), str(out), workers=1)
    assert report.ok and report.rows == {"train": 2, "val": 2}
    info = DatasetInfo.load(str(out))
    assert info.class_names == ["background", "person", "bottle", "toothbrush"]  # id order
    expected = np.zeros((h, w), np.uint8)
    expected[1:4, 2:6] = 1  # person
    expected[2:3, 3:5] = 2  # bottle (painted after the larger person)
    expected[crowd] = 255  # crowd: ignore
    rows = _rows(out, "train")
    assert np.array_equal(decode_mask(rows["COCO_train2014_000000000009"]["mask"]), expected)
    assert rows["COCO_train2014_000000000009"]["image_labels"] == [0, 1, 2]
    assert rows["COCO_train2014_000000000025"]["image_labels"] == [0]  # no annotations


# ----------------------------------------------------------------------------------------------
# Semi-supervised splits and a training step on converted data


def test_labeled_subset_by_count_and_by_list(tmp_path):
    from components.data.convert import Item

    items = [Item(f"img{i:02d}", f"/x/img{i:02d}.jpg") for i in range(20)]
    lab, unl = labeled_subset(items, "5", seed=0)
    assert len(lab) == 5 and len(unl) == 15 and not {i.id for i in lab} & {i.id for i in unl}
    assert labeled_subset(items, "5", seed=0)[0] == lab  # seeded
    assert labeled_subset(items, "5", seed=1)[0] != lab
    listed = tmp_path / "labeled.txt"
    listed.write_text("img03\n/x/img07.jpg\n")
    lab, unl = labeled_subset(items, str(listed), seed=0)
    assert [i.id for i in lab] == ["img03", "img07"] and len(unl) == 18
    listed.write_text("img03\nnope\n")
    with pytest.raises(DatasetError, match="1 listed ids are not in the split"):
        labeled_subset(items, str(listed), seed=0)


def test_semisup_cli_and_one_training_step(tmp_path):
    _voc(tmp_path / "voc")
    out = tmp_path / "out"
    args = ["voc", "--root", str(tmp_path / "voc"), "--out", str(out), "--workers", "1",
            "--labeled-from", "train_aug", "--labeled", "1", "--seed", "0"]  # fmt: skip
    assert prepare_data.main(args) == 0
    info = DatasetInfo.load(str(out))
    assert {k: v.rows for k, v in info.splits.items()} == {"val": 1, "train": 1, "unlabeled": 2}

    from components.config import ModelConfig
    from components.data.transforms import decode_train_batch
    from components.models.build import build_model

    table = read_split_table(str(out), "unlabeled")
    batch = {
        k: np.array(table.column(k).to_pylist(), dtype=object) for k in ("id", "image", "mask")
    }
    batch = decode_train_batch(batch, crop_size=16, scale_range=(1.0, 1.0), flip=False, seed=0,
                               num_classes=21)  # fmt: skip
    assert batch["valid"].all()
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", width=0.125), 21)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    logits = model(torch.from_numpy(batch["image"]))["logits"]  # at 1/output_stride
    logits = torch.nn.functional.interpolate(logits, size=(16, 16), mode="bilinear")
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(batch["mask"]),
                                             ignore_index=255)  # fmt: skip
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_verify_catches_a_wrong_row_count(tmp_path, capsys):
    _cityscapes(tmp_path / "cs")
    out = tmp_path / "out"
    assert convert(Cityscapes(str(tmp_path / "cs")), str(out), workers=1).ok
    manifest = json.loads((out / "dataset.json").read_text())
    manifest["splits"]["train"]["rows"] = 5
    (out / "dataset.json").write_text(json.dumps(manifest))
    assert prepare_data.main(["verify", "--out", str(out)]) == 1
    assert "train: 2 rows, dataset.json says 5" in capsys.readouterr().err


def test_synthetic_cli_output_verifies(tmp_path, capsys):
    out = str(tmp_path / "syn")
    assert prepare_data.main(["synthetic", "--out", out, "--num-train", "6", "--num-val", "3",
                              "--size", "32"]) == 0  # fmt: skip
    assert prepare_data.main(["verify", "--out", out]) == 0
    assert f"{out}: verified" in capsys.readouterr().out


def test_png_fixture_helper_really_writes_palette_pngs(tmp_path):
    _png(np.array([[0, 15]], np.uint8), tmp_path / "m.png", palette=VOC_PALETTE)
    img = Image.open(tmp_path / "m.png")
    assert img.mode == "P" and img.getpalette()[15 * 3 : 15 * 3 + 3] == [192, 128, 128]
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    assert np.array_equal(decode_mask(buf.getvalue()), [[0, 15]])


@pytest.mark.slow
def test_converted_rows_through_the_ray_data_ingest(ray_session, tmp_path):
    """Every converter's rows come out of the Ray Data eval pipeline pixel-exact: the masks as
    converted (checked against the references above) and the images as decoded from the files
    as distributed, padded with ignore to a multiple of 8."""
    from components.data.ingest import eval_dataset
    from components.data.shards import decode_image

    builders = {"cityscapes": (_cityscapes, Cityscapes), "voc": (_voc, VOC),
                "ade20k": (_ade20k, ADE20K), "coco": (_coco, COCO)}  # fmt: skip
    for name, (build, source_cls) in builders.items():
        root, out = tmp_path / name, tmp_path / f"{name}-out"
        build(root)
        assert convert(source_cls(str(root)), str(out), workers=1).ok, name
        info = DatasetInfo.load(str(out))
        expected = [
            (decode_image(r["image"]), decode_mask(r["mask"]))  # rows travel as uint8
            for r in _rows(out, "train").values()
        ]
        got = [
            (b["image"][k], b["mask"][k])
            for b in eval_dataset(str(out), info, "train", cache=True).iter_batches(batch_size=None)
            for k in range(len(b["mask"]))
        ]
        assert len(got) == len(expected), name
        for image, mask in got:
            h, w = expected[0][1].shape  # a fixture's images share one size
            assert mask.shape == (-(-h // 8) * 8, -(-w // 8) * 8), name
            assert np.all(mask[h:] == 255) and np.all(mask[:, w:] == 255), name
            hits = [
                k for k, (ref_image, ref_mask) in enumerate(expected)
                if np.array_equal(mask[:h, :w], ref_mask)
                and np.array_equal(image[:h, :w], ref_image)
            ]  # fmt: skip
            assert len(hits) == 1, name
