"""Ray Data ingest on the shared local Ray instance: bad rows, splits, caching."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from components.config import DataConfig
from components.data.ingest import SegDataConfig, eval_dataset, steps_per_epoch, train_dataset
from components.data.shards import DatasetInfo, ShardWriter, encode_png, mask_labels
from components.data.transforms import decode_train_batch


def _write_dataset(root, rows: int, bad: dict[int, str]) -> DatasetInfo:
    rng = np.random.default_rng(0)
    with ShardWriter(str(root), "train") as writer:
        for i in range(rows):
            image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            mask = rng.integers(0, 3, (32, 32), dtype=np.uint8)
            image_bytes, mask_bytes = encode_png(image), encode_png(mask)
            match bad.get(i):
                case "garbage":
                    image_bytes = b"not an image"
                case "size":
                    mask_bytes = encode_png(mask[:16])
                case "label":
                    mask_bytes = encode_png(np.full((32, 32), 7, np.uint8))
            writer.add(f"row-{i}", image_bytes, mask_bytes, mask_labels(mask), 32, 32)
    split = writer.close()
    info = DatasetInfo("t", 3, ["a", "b", "c"], [[0, 0, 0], [1, 1, 1], [2, 2, 2]], 255, {})
    info.splits = {"train": split, "val": split}
    (root / "val").symlink_to(root / "train")
    info.save(str(root))
    return info


@pytest.mark.slow
@pytest.mark.parametrize("cache", [True, False])
def test_bad_rows_are_flagged_not_lost(ray_session, tmp_path, cache):
    info = _write_dataset(tmp_path, 20, {3: "garbage", 7: "size", 11: "label"})
    data = DataConfig(root=str(tmp_path), crop_size=24, cache_encoded=cache)
    batches = list(train_dataset(data, info).iter_batches(batch_size=None))
    valid = np.concatenate([b["valid"] for b in batches])
    assert len(valid) == 20 and int((~valid).sum()) == 3
    masks = np.concatenate([b["mask"] for b in batches])
    assert masks.shape[1:] == (24, 24)
    assert np.all(masks[~valid] == 255)
    assert set(np.unique(masks[valid])) <= {0, 1, 2, 255}


@pytest.mark.slow
def test_val_split_unevenly_keeps_every_row(ray_session, tmp_path):
    info = _write_dataset(tmp_path, 15, {})
    ds = eval_dataset(str(tmp_path), info, "val", cache=True)
    parts = SegDataConfig().configure({"val": ds}, 4, None, None)

    def count(part) -> int:
        return sum(len(b["mask"]) for b in part["val"].iter_batches())

    # Split iterators are consumed together, as the Train workers do.
    with ThreadPoolExecutor(4) as pool:
        counts = list(pool.map(count, parts))
    assert sum(counts) == 15  # an even split would drop 3 rows


def test_steps_per_epoch_names_the_numbers(tmp_path):
    info = DatasetInfo("t", 2, ["a", "b"], [[0, 0, 0], [1, 1, 1]], 255, {})
    from components.data.shards import SplitInfo

    info.splits = {"train": SplitInfo(rows=10, shards=[], max_height=8, max_width=8)}
    assert steps_per_epoch(info, "train", 2, 2) == 2
    with pytest.raises(ValueError, match=r"10 rows.*4 worker\(s\) x batch 4"):
        steps_per_epoch(info, "train", 4, 4)


def test_large_images_decode_in_short_tasks(ray_session, tmp_path):
    """Rows per decode call (and per cached block) fall with the image size: 32 for small
    images, 8 for 512x1024 and 2 for 1024x2048 (8 * 512 * 1024 pixels per call), so a split's
    decoding spreads over many tasks; on the cached path a large images' call takes 6 of its
    small blocks; every row still arrives once, as uint8."""
    from components.data.ingest import decode_rows
    from components.data.shards import SplitInfo

    info = _write_dataset(tmp_path, rows=10, bad={})
    assert decode_rows(info, "train") == 32  # 32x32: 4096 rows' worth, capped at 32
    big = DatasetInfo("x", 3, ["a", "b", "c"], [[0, 0, 0]] * 3,
                      splits={"train": SplitInfo(10, [], 512, 1024)})  # fmt: skip
    assert decode_rows(big, "train") == 8
    assert decode_rows(big, "train", cached=True) == 48  # 6 cached blocks a call
    big.splits["train"].max_height, big.splits["train"].max_width = 1024, 2048
    assert decode_rows(big, "train") == 2
    assert decode_rows(big, "train", cached=True) == 12
    assert decode_rows(big, "missing") == 32
    assert decode_rows(info, "train", cached=True) == 32  # small images: as streamed
    info.splits["train"].max_height = info.splits["train"].max_width = 1024  # -> 4 rows
    from components.data.ingest import _encoded_rows

    rows = decode_rows(info, "train")
    assert _encoded_rows(str(tmp_path), "train", None, True, block_rows=rows).num_blocks() == 3
    data = DataConfig(root=str(tmp_path), crop_size=16, cache_encoded=True)
    batches = list(train_dataset(data, info).iter_batches(batch_size=None))
    assert sum(len(b["mask"]) for b in batches) == 10
    assert len(batches) == 1  # cached: one decode call (24 rows) over the 3 blocks
    assert all(b["image"].dtype == np.uint8 and b["image"].shape[-1] == 3 for b in batches)


@pytest.mark.slow
@pytest.mark.parametrize("cache", [True, False])
def test_the_same_seed_gives_the_same_batches_and_every_epoch_new_ones(
    ray_session, tmp_path, cache
):
    """Issue 21: a run's batches (order, crops, flips) are a function of data.shuffle_seed and
    the epoch, through the Train split a worker reads (SegDataConfig: preserve_order)."""
    info = _write_dataset(tmp_path, 96, {})  # 3 decode tasks of 32 rows

    def run(seed: int) -> list[list[np.ndarray]]:
        data = DataConfig(root=str(tmp_path), crop_size=24, cache_encoded=cache, shuffle_seed=seed)
        ds = train_dataset(data, info)
        (part,) = SegDataConfig(uneven=()).configure({"train": ds}, 1, None, None)
        return [[b["image"] for b in part["train"].iter_batches(batch_size=8)] for _ in range(2)]

    def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
        return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))

    first, again, other = run(3), run(3), run(4)
    assert len(first[0]) == 12
    assert same(first[0], again[0]) and same(first[1], again[1])
    assert not same(first[0], first[1])  # a new shuffle and new crops in the next epoch
    assert not same(first[0], other[0])


def test_augmentation_is_seeded_by_the_epoch(monkeypatch):
    """`tasks.seeded_by_epoch` reads the execution index Ray Data keeps in the task's
    DataContext."""
    from ray.data.context import DataContext

    from components.data.ingest import _augmenting

    info = DatasetInfo("t", 3, ["a", "b", "c"], [[0, 0, 0]] * 3, 255, {})
    rng = np.random.default_rng(0)
    batch = {
        "id": np.array([f"r{i}" for i in range(4)]),
        "image": np.array(
            [encode_png(rng.integers(0, 255, (32, 32, 3), np.uint8)) for _ in range(4)]
        ),
        "mask": np.array([encode_png(np.zeros((32, 32), np.uint8)) for _ in range(4)]),
    }
    decode = _augmenting(decode_train_batch, DataConfig(crop_size=16, shuffle_seed=5), info)
    context = DataContext.get_current()

    def at(epoch: int) -> np.ndarray:
        monkeypatch.setattr(context, "_execution_idx", epoch, raising=False)
        return decode(dict(batch))["image"]

    assert np.array_equal(at(0), at(0)) and np.array_equal(at(1), at(1))
    assert not np.array_equal(at(0), at(1))


@pytest.mark.slow
@pytest.mark.parametrize("in_driver", [True, False])
def test_a_labeled_subset_is_selected_once_and_repeated_in_the_driver(
    ray_session, tmp_path, monkeypatch, in_driver
):
    """`data.labeled_count` on the cached path: the chosen rows, `passes` times each, selected
    by pyarrow in the driver (not a select task per shard and pass); the rest exactly once; the
    same rows as the streamed path's per-task selection."""
    from collections import Counter

    from components.data import ingest
    from components.data.ingest import _encoded_rows
    from components.data.tasks import select_rows

    if not in_driver:  # a selection too large to copy: the same blocks repeated (a union)
        monkeypatch.setattr(ingest, "REPEAT_IN_DRIVER_BYTES", 0)
    info = _write_dataset(tmp_path, 40, {})
    chosen = frozenset(f"row-{i}" for i in (1, 5, 17, 33))

    def ids(ds) -> Counter:
        return Counter(str(i) for b in ds.iter_batches(batch_size=None) for i in b["id"])

    kept = _encoded_rows(str(tmp_path), "train", 0, True, chosen=(chosen, True, 3))
    assert ids(kept) == Counter({i: 3 for i in chosen})
    rest = _encoded_rows(str(tmp_path), "train", 0, True, chosen=(chosen, False, 1))
    assert ids(rest) == Counter({f"row-{i}": 1 for i in range(40) if f"row-{i}" not in chosen})
    streamed = _encoded_rows(str(tmp_path), "train", 0, False).map_batches(
        lambda b: select_rows(b, chosen, True), batch_format="numpy"
    )
    assert set(ids(streamed)) == chosen
    # decoded: 4 rows x 3 passes
    data = DataConfig(root=str(tmp_path), crop_size=24, cache_encoded=True)
    rows = sum(
        len(b["valid"]) for b in train_dataset(data, info, keep_ids=chosen, repeat=3).iter_batches()
    )
    assert rows == 12


def test_the_tasks_functions_import_no_torch():
    """Every function a Ray Data task unpickles makes its worker import that function's module:
    the dataset plans of ingest.py hold only functions of torch-free modules (tasks.py and the
    decoders), so a decode worker does not pay torch's import (about 2 s and 300 MB here)."""
    import subprocess
    import sys

    code = (
        "import sys, components.data.tasks, components.data.transforms; "
        "print('torch' in sys.modules, 'ray.train' in sys.modules)"
    )
    root = str(__import__("pathlib").Path(__file__).parents[2])
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False
    )
    assert out.stdout.split() == ["False", "False"], out.stderr[-2000:]
