"""Images/s of the training ingest (Ray Data) against a torch DataLoader on the same cores.

    python benchmarks/ingest_vs_dataloader.py     # no arguments; a few minutes on 2 CPU cores

Both arms run the same decode + augment (`decode_train_batch`: PNG decode, random scale
0.5-2.0, crop, flip, uint8 rows as they travel; `normalized=False`) and hand batches of 8 to a
consumer that normalises them (`data/device.model_batch`, as the worker does) and drops them.

- `ray`: `components.data.ingest.train_dataset` as a training run builds it (encoded rows cached
  in the object store, or streamed from the shards each epoch: one read task per shard, page
  checksums verified), iterated with `iter_torch_batches` in this process on a private local
  Ray instance with all the machine's CPUs, as `init_ray` starts one (started once, outside the
  timing).
- `loader`: a `torch.utils.data.DataLoader` over the split's encoded rows (read once with
  pyarrow), `num_workers` = the CPUs, persistent workers, the same decoder as its collate_fn in
  batches of 8, the rows shuffled.

Datasets: the embedded synthetic set (512 rows at 48 px, crop 48) and 192 rows of real photos
at 512x1024 (64 of scikit-image's samples resized and shifted, PNG, 19-class masks, each
written 3 times so an epoch lasts seconds), crop 512.
Each measurement is E epochs after one warm-up epoch; the arms alternate (ray, loader;
loader, ray; ...), REPEATS times each, and the medians are compared. The last line is the worst
row's ratio (ray / loader): `... ratio X.XX`.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

REPEATS = 3
BATCH = 8
PHOTO_ROWS = 64
PHOTO_COPIES = 3  # each photo's encoded row written 3 times: 192 rows an epoch
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "colorwheel")


def make_photo_dataset(root: Path) -> None:
    """64 rows of 512x1024 photos with 19-class masks, in the shard layout."""
    from skimage import data
    from skimage.transform import resize

    from components.data.images import encode_png, mask_labels
    from components.data.shards import DatasetInfo, ShardWriter

    rng = np.random.default_rng(0)
    info = DatasetInfo(
        "photos",
        19,
        [f"c{i}" for i in range(19)],
        [[(i * 37) % 256, (i * 91) % 256, (i * 53) % 256] for i in range(19)],
    )
    with ShardWriter(str(root), "train", target_shard_bytes=8 * 2**20, row_group_rows=16) as w:
        for k in range(PHOTO_ROWS):
            pixels = getattr(data, PHOTOS[k % len(PHOTOS)])()
            if pixels.ndim == 2:
                pixels = np.stack([pixels] * 3, axis=-1)
            image = resize(pixels[..., :3], (512, 1024), preserve_range=True).astype(np.uint8)
            image = np.ascontiguousarray(np.roll(image, 37 * k, axis=1))
            blocks = rng.integers(0, 19, (16, 32))
            mask = np.repeat(np.repeat(blocks, 32, 0), 32, 1).astype(np.uint8)
            encoded = encode_png(image), encode_png(mask), mask_labels(mask)
            for copy in range(PHOTO_COPIES):  # epochs of seconds, not of Ray's fixed costs
                w.add(f"p{k:03d}-{copy}", *encoded, 512, 1024)
    info.splits["train"] = w.close()
    info.save(str(root))


def _decode(crop: int, num_classes: int):
    from components.data.transforms import decode_train_batch

    return partial(
        decode_train_batch, crop_size=crop, scale_range=(0.5, 2.0), flip=True, seed=None,
        num_classes=num_classes, shuffle=False, normalized=False,
    )  # fmt: skip


def _consume(batch: dict) -> int:
    from components.data.device import model_batch

    return len(model_batch(batch)["mask"])


def ray_arm(root: str, crop: int, cache: bool, epochs: int) -> float:
    """Images/s over `epochs` epochs after a warm-up one."""
    import torch

    from components.data.ingest import train_dataset
    from components.data.shards import DatasetInfo
    from components.schema import DataConfig

    info = DatasetInfo.load(root)
    data = DataConfig(root=root, crop_size=crop, scale_min=0.5, scale_max=2.0, flip=True,
                      cache_encoded=cache, batch_size=BATCH)  # fmt: skip
    ds = train_dataset(data, info)
    dtypes = {"image": torch.uint8, "mask": torch.uint8, "valid": torch.bool}
    seen, start = 0, 0.0
    for epoch in range(epochs + 1):
        if epoch == 1:
            seen, start = 0, time.perf_counter()
        for batch in ds.iter_torch_batches(batch_size=BATCH, drop_last=True, dtypes=dtypes):
            seen += _consume(batch)
    return seen / (time.perf_counter() - start)


def loader_arm(root: str, crop: int, epochs: int, workers: int) -> float:
    from plain_loop import row_loader

    from components.data.shards import DatasetInfo

    info = DatasetInfo.load(root)
    loader = row_loader(root, "train", BATCH, _decode(crop, info.num_classes), workers)
    seen, start = 0, 0.0
    for epoch in range(epochs + 1):
        if epoch == 1:
            seen, start = 0, time.perf_counter()
        for batch in loader:
            seen += _consume(batch)
    return seen / (time.perf_counter() - start)


def main() -> int:
    import ray

    from components.data.synthetic import ensure_synthetic
    from components.schema import SyntheticConfig
    from pipelines._common import LOCAL_RUNTIME_ENV, quiet_environment, start_local_ray

    cpus = os.cpu_count() or 1
    quiet_environment(False)
    with tempfile.TemporaryDirectory() as tmp:
        synthetic, photos = Path(tmp) / "synthetic", Path(tmp) / "photos"
        ensure_synthetic(str(synthetic), SyntheticConfig())
        make_photo_dataset(photos)
        t0 = time.perf_counter()
        start_local_ray(
            num_cpus=cpus,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env=LOCAL_RUNTIME_ENV,
        )  # as init_ray starts it (nice 0)
        from components.training.trainer import quiet_ray_data

        quiet_ray_data(True)
        print(f"{platform.node()}: {cpus} CPUs; Ray started in {time.perf_counter() - t0:.1f} s")
        cases = [
            ("48 px synthetic, cached", str(synthetic), 48, True, 4),
            ("48 px synthetic, streamed", str(synthetic), 48, False, 2),
            ("512x1024 photos, crop 512, cached", str(photos), 512, True, 2),
            ("512x1024 photos, crop 512, streamed", str(photos), 512, False, 2),
        ]
        rows = []
        for label, root, crop, cache, epochs in cases:
            ray_s, loader_s = [], []
            for r in range(REPEATS):
                order = ("ray", "loader") if r % 2 == 0 else ("loader", "ray")
                for arm in order:
                    if arm == "ray":
                        ray_s.append(ray_arm(root, crop, cache, epochs))
                    else:
                        loader_s.append(loader_arm(root, crop, epochs, cpus))
            a, b = statistics.median(ray_s), statistics.median(loader_s)
            rows.append((label, a, b, a / b))
            print(
                f"{label}: ray {a:.1f} img/s (runs {', '.join(f'{v:.1f}' for v in ray_s)}), "
                f"loader {b:.1f} img/s (runs {', '.join(f'{v:.1f}' for v in loader_s)}), "
                f"ratio {a / b:.2f}",
                flush=True,
            )
        ray.shutdown()
    print("\n| ingest | Ray Data img/s | DataLoader img/s | ratio |\n|---|---|---|---|")
    for label, a, b, ratio in rows:
        print(f"| {label} | {a:.1f} | {b:.1f} | {ratio:.2f} |")
    worst = min(rows, key=lambda row: row[3])
    print(f"ingest vs DataLoader, worst row ({worst[0]}): ratio {worst[3]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
