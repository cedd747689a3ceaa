"""Train-step time of a Ray Train run against a bare PyTorch loop, same model and data.

    python benchmarks/loop_overhead.py        # no arguments; about 2.5 minutes on 2 CPU cores
    python benchmarks/loop_overhead.py --train-rows 4096   # longer epochs (512 steps)

Both arms distil the default student (DeepLabV3, ResNet-18 x0.25) with pixel KD
(`method.name=kd`) from the default teacher's architecture (ResNet-18 x0.5, random weights
saved to a file: the speed does not depend on them) on the embedded synthetic dataset (512
rows at 48 px, batch 8: 64 steps an epoch; `--train-rows N` makes N rows, N / 8 steps an epoch,
where the start of an epoch's execution weighs less in the 99th percentile), EPOCHS epochs, one
worker, and time every step with the same code (`core.train_one_epoch`: forward, backward,
optimizer step; the wait for the batch is excluded and reported apart as the data wait share).

- `ray`: `trainer.fit` as pipelines/distill.py runs it, on a private local Ray instance started
  as `init_ray` starts one for such a run (all the machine's CPUs, tasks and actors at nice 0,
  no dashboard; started for the arm, outside the timing): Ray Data decode tasks, the training
  function in this process (Ray Train's local mode, the default for one worker on a private
  instance: components/training/local_mode.py), `ray.train.report` each epoch. Its step times
  are the run's own epoch metrics (`step_ms_median` / `_mean` / `_p99`).
- `ray-worker`: the same in a worker process (`trainer.local_mode=false`, with the dashboard
  its placement-group cleaner needs), the default before local mode and on clusters.
- `bare`: one process, a DataLoader (one worker process, the same decoder) and the same
  method, optimizer and schedule; torch at its default thread count.

The first epoch of every arm is warm-up and left out. Per arm and run: the mean of the epochs'
mean step times, the median of their medians and the largest of their 99th percentiles (the
same aggregation for every arm), and the training's images/s with the data wait included (the
run's `images_per_s`: steps x batch / the epoch's training time). The arms alternate (ray,
bare, ray-worker; then rotated), REPEATS times each; medians over runs are compared. The last line is the mean step ratio
(ray / bare): `... ratio X.XX`.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

REPEATS = 3
EPOCHS = 3
ARMS = ("ray", "bare", "ray-worker")


def _cfg(data_root: str, teacher: str, storage: str, name: str, local_mode: bool | None = None):
    from components.config import merge_config, validate

    overrides = [
        f"data.root={data_root}",
        "method.name=kd",
        f"teacher.checkpoint={teacher}",
        f"trainer.epochs={EPOCHS}",
        f"trainer.storage_path={storage}",
        f"trainer.name={name}",
        f"trainer.eval_every={EPOCHS}",
        "trainer.image_every=0",
        "trainer.progress=lines",
    ]
    if local_mode is not None:
        overrides.append(f"trainer.local_mode={str(local_mode).lower()}")
    cfg = merge_config(None, overrides)
    validate(cfg)
    return cfg


def _aggregate(rows: list[dict]) -> dict[str, float]:
    rows = rows[1:]  # the first epoch warms up
    return {
        "mean": statistics.mean(r["step_ms_mean"] for r in rows),
        "median": statistics.median(r["step_ms_median"] for r in rows),
        "p99": max(r["step_ms_p99"] for r in rows),
        "wait": statistics.mean(r["data_wait_share"] for r in rows),
        "img_s": statistics.mean(r["images_per_s"] for r in rows),
    }


def ray_arm(data_root: str, teacher: str, storage: str, run: str, local_mode: bool) -> dict:
    from components.data.shards import DatasetInfo
    from components.training.trainer import fit, load_teacher

    cfg = _cfg(data_root, teacher, storage, run, local_mode)
    info = DatasetInfo.load(data_root)
    t = load_teacher(teacher, cfg.teacher.model, info.num_classes)
    fit(cfg, info, run, t)
    lines = (Path(storage) / run / "metrics.jsonl").read_text().splitlines()
    return _aggregate([json.loads(line) for line in lines])


def bare_arm(data_root: str, teacher_file: str) -> dict:
    from plain_loop import plain_method, row_loader, train_decoder

    from components.data.device import model_batch
    from components.data.shards import DatasetInfo
    from components.models.build import build_model
    from components.training.checkpoint import load_torch_file
    from components.training.core import train_one_epoch

    cfg = _cfg(data_root, teacher_file, "unused", "unused")
    info = DatasetInfo.load(data_root)
    d, k = cfg.data, info.num_classes
    teacher = build_model(cfg.teacher.model, k)
    teacher.load_state_dict(load_torch_file(Path(teacher_file)))
    teacher.eval()
    method, optimizer, schedule, steps = plain_method(cfg, info, teacher, EPOCHS, seed=0)
    decode = train_decoder(cfg, info)
    loader = row_loader(data_root, d.train_split, d.batch_size, decode, workers=1)
    progress = {"iteration": 0}
    epochs = []
    for _ in range(EPOCHS):
        stats = train_one_epoch(
            method, map(model_batch, iter(loader)), optimizer, schedule, progress, steps
        )
        ms = np.asarray(stats.step_s) * 1000
        epochs.append({
            "step_ms_mean": float(ms.mean()),
            "step_ms_median": float(np.median(ms)),
            "step_ms_p99": float(np.percentile(ms, 99)),
            "data_wait_share": stats.wait_s / stats.train_s,
            "images_per_s": stats.steps * d.batch_size / stats.train_s,
        })  # fmt: skip
    return _aggregate(epochs)


def main(argv: list[str] | None = None) -> int:
    import argparse

    import ray
    import torch

    from components.data.synthetic import ensure_synthetic
    from components.models.build import build_model
    from components.schema import ModelConfig, SyntheticConfig
    from pipelines._common import LOCAL_RUNTIME_ENV, quiet_environment, start_local_ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-rows", type=int, default=SyntheticConfig.num_train,
                        help="rows of the synthetic training split (8 a step)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.train_rows < 16:
        parser.error("--train-rows: at least 16 (two steps of 8)")
    cpus = os.cpu_count() or 1
    quiet_environment(False)
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        data_root = str(Path(tmp) / "data")
        info = ensure_synthetic(data_root, SyntheticConfig(num_train=args.train_rows))
        torch.manual_seed(0)
        teacher_file = str(Path(tmp) / "teacher.pt")
        model = build_model(ModelConfig(backbone="resnet18", width=0.5), info.num_classes)
        torch.save(model.state_dict(), teacher_file)
        print(f"{cpus} CPUs, torch {torch.__version__}, default threads "
              f"{torch.get_num_threads()}; {args.train_rows} training rows, "
              f"{args.train_rows // 8} steps an epoch", flush=True)  # fmt: skip
        default_threads = torch.get_num_threads()
        for r in range(REPEATS):
            order = ARMS[r % len(ARMS) :] + ARMS[: r % len(ARMS)]
            for arm in order:
                if arm == "bare":
                    torch.set_num_threads(default_threads)
                    out = bare_arm(data_root, teacher_file)
                else:
                    local = arm == "ray"
                    start_local_ray(include_dashboard=not local, dashboard_host="127.0.0.1",
                                    runtime_env=LOCAL_RUNTIME_ENV, log_to_driver=False)  # fmt: skip
                    out = ray_arm(data_root, teacher_file, str(Path(tmp) / "runs"),
                                  f"{arm}-{r}", local)  # fmt: skip
                    ray.shutdown()
                results[arm].append(out)
                print(f"run {r} {arm}: mean {out['mean']:.1f} ms, median {out['median']:.1f}, "
                      f"p99 {out['p99']:.1f}, data wait {100 * out['wait']:.1f}%, "
                      f"{out['img_s']:.1f} img/s", flush=True)  # fmt: skip

    def med(arm: str, key: str) -> float:
        return statistics.median(x[key] for x in results[arm])

    keys = ("mean", "median", "p99", "wait", "img_s")
    bare = {key: med("bare", key) for key in keys}
    print("\n| arm | mean ms | median ms | p99 ms | data wait | img/s | mean / bare | p99 / bare "
          "| img/s / bare |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for arm in ARMS:
        m = {key: med(arm, key) for key in keys}
        print(f"| {arm} | {m['mean']:.1f} | {m['median']:.1f} | {m['p99']:.1f} | "
              f"{100 * m['wait']:.1f}% | {m['img_s']:.1f} | {m['mean'] / bare['mean']:.2f} | "
              f"{m['p99'] / bare['p99']:.2f} | {m['img_s'] / bare['img_s']:.2f} |")  # fmt: skip
    p99 = med("ray", "p99") / bare["p99"]
    print(
        f"training img/s, data wait included (ray / bare): {med('ray', 'img_s') / bare['img_s']:.2f}"
    )
    print(f"p99 step ratio (ray / bare): {p99:.2f}")
    print(f"train step, mean (ray / bare): ratio {med('ray', 'mean') / bare['mean']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
