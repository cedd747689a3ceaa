"""The synthetic method benchmark (issue 3): every supervised method, same teacher, same budget.

    python benchmarks/synthetic_methods.py                          # the full table, 3 seeds
    python benchmarks/synthetic_methods.py --methods none kd --seeds 0 --iters 100   # a quick look

Runs in one process on the training core the Ray workers run (`components/training/core.py`:
`train_one_epoch` with the config's optimizer and schedule, then `predict_confusion`), on the
same shards, transforms, models and `build_method`, so 33 short runs do not each pay Ray Train's
fixed start-up. A teacher is trained once (`method: none`) and shared by every run.
Step time is the 25th percentile of a run's training-step wall times (teacher forward included),
measured in the same process, so the ratios to `none` compare like with like; a low percentile
rather than the median because noise on a shared machine (preemption, code pages faulted back in)
only ever adds time. The median is kept in the JSON. Results are written as JSON and a
Markdown table (`--out`, default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.pretrained import CHOICES, pretrained_overrides
from components.config import Config, ModelConfig, merge_config
from components.data.decode import decode_split
from components.data.shards import read_split_table
from components.data.synthetic import ensure_synthetic
from components.data.transforms import decode_train_batch
from components.distillation.build import build_method
from components.metrics import miou
from components.models.build import build_model
from components.regimes import SUPERVISED
from components.training.core import EpochStats, train_one_epoch
from components.training.evaluation import predict_confusion
from components.training.schedule import Schedule, build_optimizer

# name -> overrides on top of the default config (the ablations switch one texture term off).
METHODS = {
    "none": ["method.name=none"],
    "kd": ["method.name=kd"],
    "cwd": ["method.name=cwd"],
    "skd": ["method.name=skd"],
    "cirkd": ["method.name=cirkd"],
    "sstkd": ["method.name=sstkd"],
    "sstkd_structural_only": ["method.name=sstkd", "method.weights.statistical=0"],
    "sstkd_statistical_only": ["method.name=sstkd", "method.weights.structural=0"],
    "kd_plus_texture": ["method.name=sstkd", "method.weights.adversarial=0"],
    # The two that collapse at their published weights, with the feature-level term scaled down
    # (docs/benchmarks.md: its gradient is 16-170x CE's at initialisation here).
    "cwd_scaled": ["method.name=cwd", "method.cwd_temperature=1", "method.weights.cwd_feature=5"],
    "cirkd_scaled": ["method.name=cirkd", "method.weights.batch_pixel=0.1"],
}


class Data:
    """The decoded train and val splits, in memory; train batches are augmented on the fly."""

    def __init__(self, cfg: Config):
        info = ensure_synthetic(cfg.data.root, cfg.data.synthetic)
        self.info, self.cfg = info, cfg
        cols = ["id", "image", "mask"]
        self.train = read_split_table(cfg.data.root, "train", cols).to_pydict()
        self.val = decode_split(cfg.data.root, info, "val")

    def train_batches(self, seed: int):
        d, rng = self.cfg.data, np.random.default_rng(seed)
        n = len(self.train["id"])
        epoch = 0
        while True:
            order = rng.permutation(n)
            for start in range(0, n - d.batch_size + 1, d.batch_size):
                idx = order[start : start + d.batch_size]
                rows = {
                    k: np.array([v[i] for i in idx], dtype=object) for k, v in self.train.items()
                }
                out = decode_train_batch(
                    rows,
                    crop_size=d.crop_size,
                    scale_range=(d.scale_min, d.scale_max),
                    flip=d.flip,
                    seed=seed * 100_003 + epoch,
                    num_classes=self.info.num_classes,
                )
                yield {
                    "image": torch.from_numpy(out["image"]),
                    "mask": torch.from_numpy(out["mask"].astype(np.int64)),
                }
            epoch += 1

    def val_miou(self, model: torch.nn.Module) -> float:
        batches = [
            {
                "image": torch.from_numpy(self.val["image"][i : i + 16]),
                "mask": torch.from_numpy(self.val["mask"][i : i + 16].astype(np.int64)),
                "valid": torch.from_numpy(self.val["valid"][i : i + 16]),
            }
            for i in range(0, len(self.val["id"]), 16)
        ]
        return miou(predict_confusion(model, batches, self.info.num_classes))[0]


def step_times(stats: EpochStats) -> dict:
    """The 25th percentile and the median of a run's step times, in ms (noise on a shared
    machine only ever adds time, so the low percentile is the comparable figure)."""
    ordered = sorted(stats.step_s)
    return {
        "step_ms": 1000 * ordered[len(ordered) // 4],
        "step_ms_median": 1000 * statistics.median(ordered),
    }


def train(
    cfg: Config,
    data: Data,
    iters: int,
    seed: int,
    teacher: torch.nn.Module | None = None,
    model_cfg: ModelConfig | None = None,
) -> dict:
    """One run of `iters` steps of `model_cfg` (default: cfg.model) through the training core;
    returns val mIoU, the step times, the mean of each loss term and the trained model."""
    torch.manual_seed(seed)
    k = data.info.num_classes
    student = build_model(model_cfg or cfg.model, k)
    method = build_method(cfg, student, teacher, num_classes=k)
    optimizer = build_optimizer(method.trainable, cfg.optim)
    schedule = Schedule.of(optimizer, iters, cfg.optim)
    batches = data.train_batches(seed)
    stats = train_one_epoch(method, batches, optimizer, schedule, {"iteration": 0}, iters)
    model = method.eval_model()
    return {
        "miou": data.val_miou(model),
        **step_times(stats),
        "terms": stats.means(),
        "model": model,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--iters", type=int, default=400, help="student steps per run")
    parser.add_argument("--teacher-iters", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument(
        "--pretrained",
        choices=CHOICES,
        default="synthetic",
        help="backbones: the synthetic pretraining stage's (made once, cached) or from scratch",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides for every run")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.pretrained == "synthetic":
        found = pretrained_overrides(merge_config(None, args.overrides), ["model", "teacher.model"])
        args.overrides = [*found, *args.overrides]
    base = merge_config(None, args.overrides)
    data = Data(base)

    t0 = time.perf_counter()
    tcfg = merge_config(None, [*args.overrides, "method.name=none", f"optim.lr={base.teacher.lr}"])
    teacher_run = train(tcfg, data, args.teacher_iters, seed=1234, model_cfg=tcfg.teacher.model)
    teacher = teacher_run["model"].eval().requires_grad_(False)
    print(f"teacher: val mIoU {100 * teacher_run['miou']:.2f} ({time.perf_counter() - t0:.0f} s)")

    results: dict[str, list[dict]] = {}
    for name in args.methods:
        cfg = merge_config(None, [*args.overrides, *METHODS[name]])
        for seed in args.seeds:
            t0 = time.perf_counter()
            needed = SUPERVISED.needs_teacher(cfg.method.name)
            run = train(cfg, data, args.iters, seed, teacher if needed else None)
            run.pop("model")
            run["seed"], run["wall_s"] = seed, time.perf_counter() - t0
            results.setdefault(name, []).append(run)
            print(
                f"{name:24s} seed {seed}: mIoU {100 * run['miou']:.2f}  "
                f"step {run['step_ms']:.1f} ms  ({run['wall_s']:.0f} s)",
                flush=True,
            )
    write_results(args, base, teacher_run["miou"], results)


def write_results(args, base: Config, teacher_miou: float, results: dict) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ref = statistics.median(r["step_ms"] for r in results.get("none", [{"step_ms": float("nan")}]))
    lines = [
        (
            f"Teacher ({base.teacher.model.backbone} x{base.teacher.model.width:g}, "
            f"{args.teacher_iters} steps): val mIoU {100 * teacher_miou:.2f}. "
            f"Students: {base.model.backbone} x{base.model.width:g}, {args.iters} steps, "
            f"seeds {args.seeds}."
        ),
        "",
        "| method | val mIoU (mean ± std) | step ms (25th pct.) | step time / none |",
        "|---|---|---|---|",
    ]
    for name, runs in results.items():
        m = [100 * r["miou"] for r in runs]
        std = statistics.stdev(m) if len(m) > 1 else 0.0
        step = statistics.median(r["step_ms"] for r in runs)
        lines.append(
            f"| {name} | {statistics.mean(m):.2f} ± {std:.2f} | {step:.1f} | {step / ref:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    (out / "synthetic_methods.md").write_text(table + "\n")
    (out / "synthetic_methods.json").write_text(
        json.dumps({"teacher_miou": teacher_miou, "args": vars(args), "runs": results}, indent=1)
    )


if __name__ == "__main__":
    main()
