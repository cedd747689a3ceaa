import dataclasses
import os
import subprocess

import numpy as np
import pytest
from scipy.ndimage import binary_erosion

from components.config import SyntheticConfig
from components.data.shards import (
    DatasetError,
    DatasetInfo,
    decode_image,
    decode_mask,
    list_shards,
    read_split_table,
)
from components.data.synthetic import (
    class_names,
    class_textures,
    ensure_synthetic,
    make_sample,
    make_synthetic,
    palette,
)

K = 5
TINY = SyntheticConfig(num_train=12, num_val=6, num_unlabeled=4, size=32, num_classes=K, seed=3)


def test_make_sample_is_deterministic_per_seed_and_index():
    image, mask = make_sample(7, 32, K, seed=1)
    again = make_sample(7, 32, K, seed=1)
    assert np.array_equal(image, again[0]) and np.array_equal(mask, again[1])
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert mask.shape == (32, 32) and mask.dtype == np.uint8
    assert not np.array_equal(image, make_sample(7, 32, K, seed=2)[0])
    assert not np.array_equal(image, make_sample(8, 32, K, seed=1)[0])


def test_masks_cover_every_class_and_stay_in_range():
    masks = np.stack([make_sample(i, 32, K, seed=0)[1] for i in range(64)])
    assert masks.max() <= K - 1
    assert set(np.unique(masks).tolist()) == set(range(K))


def test_names_and_palette_are_distinct():
    for k in (2, 5, 21):
        names, colours = class_names(k), palette(k)
        assert names[0] == "background" and len(set(names)) == k
        assert len({tuple(c) for c in colours}) == k
        assert all(0 <= v <= 255 for c in colours for v in c)
    assert class_names(5)[1].startswith("grating_0deg")


def test_make_synthetic_writes_consistent_splits(tmp_path):
    info = make_synthetic(str(tmp_path), TINY)
    assert info == DatasetInfo.load(str(tmp_path))
    assert {s: v.rows for s, v in info.splits.items()} == {"train": 12, "val": 6, "unlabeled": 4}
    assert info.class_names == class_names(K) and info.name == "synthetic"
    ids = {}
    for split in info.splits:
        assert [os.path.basename(p) for p in list_shards(str(tmp_path), split)] == (
            info.splits[split].shards
        )
        table = read_split_table(str(tmp_path), split)
        ids[split] = set(table.column("id").to_pylist())
        assert f"synthetic-{split}-000000" in ids[split]
        for row in table.to_pylist():
            image, mask = decode_image(row["image"]), decode_mask(row["mask"])
            assert image.shape == (32, 32, 3) and (row["height"], row["width"]) == (32, 32)
            assert row["image_labels"] == np.unique(mask).tolist()
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["unlabeled"]
    # disjoint in content too, not just in name
    first = {s: read_split_table(str(tmp_path), s).column("image")[0].as_py() for s in ids}
    assert len(set(first.values())) == 3


def _train_table(path, seed: int):
    make_synthetic(str(path), SyntheticConfig(num_train=4, num_val=2, size=32, seed=seed))
    return read_split_table(str(path), "train")


def test_same_config_gives_identical_bytes(tmp_path):
    first = _train_table(tmp_path / "a", seed=9)
    assert first.equals(_train_table(tmp_path / "b", seed=9))
    other = _train_table(tmp_path / "c", seed=10)
    assert other.column("image").to_pylist() != first.column("image").to_pylist()


def test_ensure_synthetic_builds_once_and_leaves_no_temp(tmp_path):
    root = tmp_path / "ds"
    info = ensure_synthetic(str(root), TINY)
    assert sorted(os.listdir(tmp_path)) == ["ds"]
    assert info.splits["train"].rows == 12
    manifest = root / "dataset.json"
    before = manifest.stat().st_mtime_ns
    shard_before = os.stat(list_shards(str(root), "train")[0]).st_mtime_ns
    assert ensure_synthetic(str(root), TINY) == info
    assert manifest.stat().st_mtime_ns == before
    assert os.stat(list_shards(str(root), "train")[0]).st_mtime_ns == shard_before


def test_existing_dataset_of_another_size_is_reused_with_a_warning(tmp_path, caplog):
    root = str(tmp_path / "ds")
    ensure_synthetic(root, TINY)
    bigger = dataclasses.replace(TINY, num_train=20, num_unlabeled=0)
    with caplog.at_level("WARNING", logger="segdistill.data"):
        info = ensure_synthetic(root, bigger)
    assert info.splits["train"].rows == 12  # never silently regenerated over a user's folder
    text = caplog.text
    assert "12 train rows, num_train=20" in text and "4 unlabeled rows, num_unlabeled=0" in text
    assert "val rows" not in text and "classes" not in text
    caplog.clear()
    with caplog.at_level("WARNING", logger="segdistill.data"):
        ensure_synthetic(root, TINY)
    assert caplog.text == ""


def test_ensure_synthetic_removes_stale_temps_and_refuses_foreign_folders(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    for pid in (os.getpid(), dead.pid):
        (tmp_path / f"ds.tmp-{pid}" / "train").mkdir(parents=True)
    ensure_synthetic(str(tmp_path / "ds"), TINY)
    assert sorted(os.listdir(tmp_path)) == ["ds"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="without dataset.json"):
        ensure_synthetic(str(tmp_path / "other"), TINY)
    (tmp_path / "ds" / "dataset.json").write_text("{broken")
    with pytest.raises(DatasetError, match="dataset.json: not valid JSON"):
        ensure_synthetic(str(tmp_path / "ds"), TINY)


def _foreground_pixels(samples):
    colours, labels = [], []
    for image, mask in samples:
        colours.append(image[mask > 0].astype(np.float64))
        labels.append(mask[mask > 0])
    return np.concatenate(colours), np.concatenate(labels)


def test_colour_alone_does_not_give_the_class_away():
    # nearest per-class mean colour, fit on half the images, scored on the other half
    samples = [make_sample(i, 32, K, seed=0) for i in range(256)]
    fit_x, fit_y = _foreground_pixels(samples[:128])
    test_x, test_y = _foreground_pixels(samples[128:])
    classes = np.arange(1, K)
    centroids = np.stack([fit_x[fit_y == c].mean(0) for c in classes])
    pred = classes[np.argmin(((test_x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)]
    balanced_accuracy = np.mean([(pred[test_y == c] == c).mean() for c in classes])
    assert balanced_accuracy < 1.5 / K  # chance is 1 / (K - 1) = 0.25


def test_texture_separates_the_two_gratings():
    # gradient energy along x vs y over object interiors tells 0 deg from 90 deg gratings
    t1, t2 = class_textures(K)[:2]
    assert (t1.family, t1.angle, t2.family, t2.angle) == ("grating", 0, "grating", 90)
    correct = []
    for i in range(48):
        image, mask = make_sample(i, 64, K, seed=0)
        gy, gx = np.gradient(image.astype(np.float64), axis=(0, 1))
        for cls in (1, 2):
            inside = binary_erosion(mask == cls, iterations=2)
            if inside.sum() >= 20:
                correct.append(((gx[inside] ** 2).sum() > (gy[inside] ** 2).sum()) == (cls == 1))
    assert len(correct) >= 20 and np.mean(correct) > 0.95
