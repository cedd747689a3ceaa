"""Weakly supervised data: decoding image-level labels, the driver-side label check, and the
diagnostics (CAM / pseudo-label mIoU, classification mAP) on a dataset in the real shard layout."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from components.config import WeaklyConfig
from components.data.shards import DatasetError, DatasetInfo, ShardWriter, encode_png, mask_labels
from components.data.transforms import IMAGENET_MEAN, IMAGENET_STD, decode_weak_batch
from components.weakly.data import check_image_labels
from components.weakly.diagnostics import average_precision, diagnose, iter_rows

K = 3  # background, "red", "green"


def _sample(seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """An image whose red square is class 1 and green square class 2 (some images lack one)."""
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size, 3), np.uint8)
    mask = np.zeros((size, size), np.uint8)
    for cls in (1, 2):
        if rng.random() < 0.7:
            y, x = rng.integers(0, size - 6, 2)
            image[y : y + 6, x : x + 6] = 0
            image[y : y + 6, x : x + 6, cls - 1] = 255
            mask[y : y + 6, x : x + 6] = cls
    return image, mask


def _dataset(root, rows: int = 12) -> DatasetInfo:
    info = DatasetInfo("t", K, ["bg", "red", "green"], [[0, 0, 0], [255, 0, 0], [0, 255, 0]])
    for split in ("train", "val"):
        with ShardWriter(str(root), split) as w:
            for i in range(rows):
                image, mask = _sample(i if split == "train" else 100 + i)
                w.add(f"{split}-{i}", encode_png(image), encode_png(mask), mask_labels(mask),
                      16, 16)  # fmt: skip
        info.splits[split] = w.close()
    info.save(str(root))
    return info


def _batch(labels: list, masks: list | None = None) -> dict:
    n = len(labels)
    image = encode_png(np.full((16, 16, 3), 100, np.uint8))
    return {
        "id": np.array([f"r{i}" for i in range(n)]),
        "image": np.array([image] * n, dtype=object),
        "mask": np.array(masks or [encode_png(np.zeros((16, 16), np.uint8))] * n, dtype=object),
        "image_labels": np.array(labels, dtype=object),
    }


def test_decode_weak_batch_labels_and_bad_rows():
    bad_mask = encode_png(np.full((8, 8), 1, np.uint8))  # wrong size: diagnostics only
    good_mask = encode_png(np.zeros((16, 16), np.uint8))
    batch = _batch(
        [[0, 2], [0], None, [0, 7], [1, 2]], [good_mask, good_mask, good_mask, good_mask, bad_mask]
    )
    out = decode_weak_batch(batch, crop_size=16, scale_range=(1.0, 1.0), flip=False, num_classes=K)
    assert out["labels"].tolist() == [[0, 1], [0, 0], [0, 0], [0, 0], [1, 1]]
    # missing labels and an id >= K make a row bad; a bad diagnostic mask does not
    assert out["valid"].tolist() == [True, True, False, False, True]
    assert out["background_only"].tolist() == [False, True, False, False, False]
    assert (out["mask"][4] == 255).all() and (out["mask"][0] == 0).all()
    assert out["area"][0].all() and not out["area"][2].any()
    assert (out["image"][2] == 0).all()
    # a null item inside the list is a bad row with a reason, not a crashed decode task
    out = decode_weak_batch(
        _batch([[0, None]]), crop_size=16, scale_range=(1.0, 1.0), flip=False, num_classes=K
    )
    assert out["valid"].tolist() == [False]


def test_decode_weak_batch_area_marks_padding():
    out = decode_weak_batch(
        _batch([[0, 1]]), crop_size=24, scale_range=(1.0, 1.0), flip=False, num_classes=K
    )
    area = out["area"][0]
    assert area[:16, :16].all() and not area[16:].any() and not area[:, 16:].any()


def test_check_image_labels_counts_and_errors(tmp_path):
    _dataset(tmp_path)
    counts = check_image_labels(str(tmp_path), "train", K)
    assert counts["rows"] == 12 and counts["missing"] == counts["out_of_range"] == 0
    expected_bg = sum(1 for i in range(12) if not (_sample(i)[1] > 0).any())
    assert counts["background_only"] == expected_bg

    # A shard with a null list and an out-of-range id: counted and named, not fatal.
    schema = pa.schema([("id", pa.string()), ("image_labels", pa.list_(pa.int16()))])
    odd = tmp_path / "odd" / "train"
    odd.mkdir(parents=True)
    pq.write_table(
        pa.table({"id": ["a", "b", "c"], "image_labels": [None, [0, 9], [0, 1]]}, schema=schema),
        odd / "part-00000.parquet",
    )
    counts = check_image_labels(str(tmp_path / "odd"), "train", K)
    assert (counts["missing"], counts["out_of_range"]) == (1, 1)
    # Every row unusable: an error naming the split.
    pq.write_table(
        pa.table({"id": ["a"], "image_labels": [None]}, schema=schema), odd / "part-00000.parquet"
    )
    with pytest.raises(DatasetError, match="'train'.*none of its 1 rows"):
        check_image_labels(str(tmp_path / "odd"), "train", K)
    # No column at all: named with the shard.
    pq.write_table(pa.table({"id": ["a"]}), odd / "part-00000.parquet")
    with pytest.raises(DatasetError, match="part-00000.parquet.*no 'image_labels'"):
        check_image_labels(str(tmp_path / "odd"), "train", K)


def test_average_precision_by_hand():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.1])
    positives = np.array([1, 0, 1, 0, 1])
    # precision at the positives' ranks 1, 3, 5: 1/1, 2/3, 3/5
    assert average_precision(scores, positives) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert np.isnan(average_precision(scores, np.zeros(5)))


class _ColourNet(nn.Module):
    """A stand-in network whose CAM of class c is the image's channel c-1 (in [0, 1]) and whose
    classifier says 'present' when that channel has a bright pixel: an oracle on _sample."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))

    def _rgb(self, x):
        mean = x.new_tensor(IMAGENET_MEAN / 255)[None, :, None, None]
        std = x.new_tensor(IMAGENET_STD / 255)[None, :, None, None]
        return (x * std + mean)[:, : K - 1]

    def cam(self, x):
        return self._rgb(x) + self.p

    def forward(self, x):
        return {"cls_logits": 20 * (self._rgb(x).amax((2, 3)) - 0.5)}


def test_diagnose_scores_an_oracle_perfectly_and_a_wrong_one_badly(tmp_path):
    _dataset(tmp_path)
    weakly = WeaklyConfig(cam_scales=[1.0], cam_flip=False, refine="none")
    rows = list(iter_rows(str(tmp_path), "train", K))
    assert len(rows) == 12 and rows[0][3].shape == (K - 1,)
    report = diagnose(_ColourNet(), rows, K, weakly)
    assert report["cam_miou"] == pytest.approx(1.0)
    assert report["pseudo_miou"] == pytest.approx(1.0)
    assert report["pseudo_labeled"] == pytest.approx(1.0)
    assert report["cls_map"] == pytest.approx(1.0) and report["cls_accuracy"] == 1.0
    assert report["images"] == 12

    class Swapped(_ColourNet):  # red and green exchanged
        def cam(self, x):
            return super().cam(x).flip(1)

    swapped = diagnose(Swapped(), rows, K, weakly)
    # Present-class masking keeps a swapped CAM from winning where its class is absent, so only
    # images with both squares go wrong; the score must still drop clearly.
    assert swapped["cam_miou"] < 0.9
    limited = list(iter_rows(str(tmp_path), "val", K, limit=5))
    assert len(limited) == 5


def test_decode_weak_batch_seed_makes_the_augmentation_reproducible():
    rng = np.random.default_rng(0)
    image = encode_png(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    batch = _batch([[0, 1]] * 4)
    batch["image"] = np.array([image] * 4, dtype=object)

    def crops(seed):
        return decode_weak_batch(
            batch, crop_size=12, scale_range=(0.5, 2.0), flip=True, num_classes=K, seed=seed
        )["image"]

    np.testing.assert_array_equal(crops(3), crops(3))
    assert not np.array_equal(crops(3), crops(4))
