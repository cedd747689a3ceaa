"""Val rows decoded once in the workers (data/local_val.py): every row in exactly one worker's
share, decoded as the Ray Data path decodes it; the size rule."""

from __future__ import annotations

import numpy as np
import torch

from components.config import DataConfig
from components.data.decode import decode_split
from components.data.local_val import VAL_IN_WORKER_BYTES, LocalVal, eval_pad, val_in_workers
from components.data.shards import DatasetInfo, ShardWriter, encode_png, mask_labels


def _dataset(root, rows: int = 11, shards: int = 3) -> DatasetInfo:
    rng = np.random.default_rng(0)
    info = DatasetInfo("t", 3, ["a", "b", "c"], [[0, 0, 0], [9, 9, 9], [20, 20, 20]])
    with ShardWriter(str(root), "val", target_shard_bytes=1, row_group_rows=4) as w:
        for i in range(rows):
            h, w_ = (20, 28) if i % 2 else (24, 17)
            image = rng.integers(0, 255, (h, w_, 3), dtype=np.uint8)
            mask = rng.integers(0, 3, (h, w_), dtype=np.uint8)
            image_bytes = b"broken" if i == 4 else encode_png(image)
            w.add(f"r{i:02d}", image_bytes, encode_png(mask), mask_labels(mask), h, w_)
    info.splits["val"] = w.close()
    assert len(info.splits["val"].shards) >= shards
    info.save(str(root))
    return info


def test_shares_cover_the_split_once_and_decode_as_the_driver_does(tmp_path):
    info = _dataset(tmp_path)
    assert eval_pad(info, "val") == (24, 32)  # 24 x 28 rounded up to multiples of 8
    whole = decode_split(str(tmp_path), info, "val", normalized=False)
    h, w = eval_pad(info, "val")
    got = {}
    for world in (1, 2, 3):
        parts = [LocalVal(str(tmp_path), info, "val", rank, world) for rank in range(world)]
        assert sum(len(p) for p in parts) == 11
        for rank, part in enumerate(parts):
            rows = list(range(rank, 11, world))
            assert len(part) == len(rows)
            for k, row in enumerate(rows):
                image = whole["image"][row]
                mask = whole["mask"][row]
                hh, ww = image.shape[:2]
                assert part.columns["image"][k].shape == (h, w, 3)
                assert np.array_equal(part.columns["image"][k][:hh, :ww], image)
                assert np.array_equal(part.columns["mask"][k][:hh, :ww], mask)
                assert part.columns["valid"][k] == whole["valid"][row]
            batches = list(part.batches(2, torch.device("cpu")))
            assert sum(len(b["mask"]) for b in batches) == len(rows)
            assert all(b["image"].dtype == torch.uint8 for b in batches)
        got[world] = sorted(int(v) for p in parts for v in p.columns["valid"])
    assert got[1] == got[2] == got[3] and got[1].count(0) == 1  # row 4 is bad in every split


def test_the_size_rule(tmp_path):
    info = _dataset(tmp_path)
    data = DataConfig(root=str(tmp_path))
    assert val_in_workers(data, info, 1)
    assert not val_in_workers(DataConfig(root=str(tmp_path), val_in_workers=False), info, 1)
    info.splits["val"].rows = 500
    info.splits["val"].max_height, info.splits["val"].max_width = 1024, 2048  # Cityscapes val
    assert 500 * 1024 * 2048 * 4 > VAL_IN_WORKER_BYTES
    assert not val_in_workers(data, info, 1) and not val_in_workers(data, info, 8)
    assert val_in_workers(data, info, 16)  # 32 rows a worker: 256 MiB
    assert val_in_workers(DataConfig(root=str(tmp_path), val_in_workers=True), info, 1)
