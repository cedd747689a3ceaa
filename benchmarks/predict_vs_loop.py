"""Images/s of pipelines/predict.py's Ray Data actor pool against a plain loop in one process.

    python benchmarks/predict_vs_loop.py          # no arguments; a few minutes on 2 CPU cores

The same 48 photos (scikit-image's astronaut, coffee, chelsea, rocket, immunohistochemistry and
colorwheel, 300-640 px, each as 8 JPEGs in nested folders), the same untrained model (DeepLabV3,
ResNet-18 at width 0.25, the default student's size; 5 classes), the same whole-image mode and
the same code for each image: `decode_batch` -> `Predictor` -> `write_batch` of
components/predict.py (labels + overlays PNGs).

- `pool`: `predict_rows`, as pipelines/predict.py runs it: read and decode tasks, the model in an
  actor pool sized by `plan_pool` for this machine (one actor per GPU; on CPU, one-CPU actors on
  all CPUs but one, which is left to the tasks), write tasks. Timed from the call to the last
  row: the actors' start and model load are in it, Ray's own start is not (printed apart).
- `loop`: one process, file by file: read the bytes, the same three functions, torch at its
  default thread count (every core), the model loaded inside the timing as the actors do.

The arms alternate (pool, loop; loop, pool; pool, loop), each into a fresh output folder; the
medians of 3 runs each are compared. The last line is `... ratio X.XX` (pool / loop).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

REPEATS = 3
COPIES = 8
CLASSES = 5
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "colorwheel")


def make_photos(root: Path) -> int:
    from PIL import Image
    from skimage import data

    n = 0
    for name in PHOTOS:
        pixels = getattr(data, name)()
        if pixels.ndim == 2:
            pixels = np.stack([pixels] * 3, axis=-1)
        pixels = pixels[..., :3]
        for k in range(COPIES):
            path = root / f"set{k % 2}" / f"part{k}" / f"{name}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            variant = pixels[:, ::-1] if k % 2 else pixels
            Image.fromarray(np.ascontiguousarray(variant)).save(path, quality=90)
            n += 1
    return n


def make_checkpoint(folder: Path) -> str:
    import torch

    from components.config import ModelConfig
    from components.models.build import build_model
    from components.training.checkpoint import save_checkpoint

    torch.manual_seed(0)
    cfg = ModelConfig(width=0.25)
    model = build_model(cfg, CLASSES)
    meta = {"num_classes": CLASSES, "model": dataclasses.asdict(cfg), "ignore_index": 255}
    save_checkpoint(folder, model.state_dict(), None, {**meta, "progress": {"iteration": 0}})
    return str(folder)


def run_pool(inputs, plan, checkpoint: str, mode, pool) -> tuple[float, int]:
    from components.predict import predict_rows

    start = time.perf_counter()
    rows = list(predict_rows(inputs, inputs.items, plan, checkpoint, mode, pool))
    seconds = time.perf_counter() - start
    assert all(not r["error"] for r in rows), [r["error"] for r in rows if r["error"]]
    return seconds, len(rows)


def run_loop(inputs, plan, checkpoint: str, mode) -> tuple[float, int]:
    from components.predict import Predictor, decode_batch, write_batch

    start = time.perf_counter()
    predictor = Predictor(checkpoint, mode)  # torch's default threads: every core
    done = 0
    for item in inputs.items:
        with inputs.fs.open_input_file(item.key) as f:
            data = f.read()
        batch = {"path": np.array([item.key], dtype=object), "bytes": np.array([data], object)}
        rows = write_batch(
            predictor(decode_batch(batch, {item.key: (item.stem, item.source)}, "path")), plan
        )
        assert not rows["error"][0], rows["error"][0]
        done += 1
    return time.perf_counter() - start, done


def main() -> int:
    import torch

    from components.inference import EvalMode
    from components.predict import Plan, default_palette, list_images, plan_pool
    from pipelines._common import init_ray, quiet_environment

    quiet_environment(verbose=False)
    with tempfile.TemporaryDirectory(prefix="segdistill-predict-bench-") as tmp:
        tmp = Path(tmp)
        n = make_photos(tmp / "photos")
        checkpoint = make_checkpoint(tmp / "ckpt" / "epoch_0000")
        inputs = list_images(str(tmp / "photos"))
        mode = EvalMode()

        start = time.perf_counter()
        init_ray()
        import ray
        from ray.data import DataContext

        ray_start = time.perf_counter() - start
        from ray.data._internal.logging import configure_logging

        configure_logging()  # as pipelines/predict.py: Ray Data's notices off the console
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        pool = plan_pool(ray.cluster_resources(), None, None, images=n)

        cpus = os.cpu_count()
        print(f"{n} photos, DeepLabV3 ResNet-18 x0.25, {CLASSES} classes, whole-image mode")
        print(
            f"machine: {cpus} CPU cores, {platform.processor() or platform.machine()}, "
            f"{'GPU' if torch.cuda.is_available() else 'no GPU'}; "
            f"ray {ray.__version__}, torch {torch.__version__}"
        )
        print(
            f"pool: {pool.describe()}, {pool.batch_size} images per call; "
            f"loop: one process, torch {torch.get_num_threads()} threads"
        )
        print(f"Ray start (not timed in the arms): {ray_start:.1f} s")

        rates: dict[str, list[float]] = {"pool": [], "loop": []}
        for r in range(REPEATS):
            order = ("pool", "loop") if r % 2 == 0 else ("loop", "pool")
            for arm in order:
                plan = Plan(str(tmp / f"out-{arm}-{r}"), default_palette(CLASSES))
                if arm == "pool":
                    seconds, done = run_pool(inputs, plan, checkpoint, mode, pool)
                else:
                    seconds, done = run_loop(inputs, plan, checkpoint, mode)
                rates[arm].append(done / seconds)
                print(
                    f"  run {r + 1} {arm}: {done} images in {seconds:.1f} s, "
                    f"{done / seconds:.2f} images/s",
                    flush=True,
                )
        pool_rate = statistics.median(rates["pool"])
        loop_rate = statistics.median(rates["loop"])
        print(
            f"median images/s: predict actor pool {pool_rate:.2f}, plain loop {loop_rate:.2f}, "
            f"ratio {pool_rate / loop_rate:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
