"""The weakly supervised benchmark (issue 7): AFA-style baseline vs TSCD, three seeds.

    python benchmarks/wsss_synthetic.py                                # the full table
    python benchmarks/wsss_synthetic.py --variants afa tscd --seeds 0 --iters 60 \
        method.weakly.warmup_iters=30                                   # a quick look

Variants (all `method.name=tscd`, the embedded default's network and data, configs/
tscd_synthetic.yaml): `afa` (no SCD, AFA's PAR refinement), `afa+varm` (VARM instead),
`afa+scd` (SCD, AFA's PAR refinement), `tscd` (SCD + VARM). Every run has the same number of steps on
the same image-level labels; pseudo-label and CAM mIoU are scored on (up to --diagnose-rows of)
the train images against their masks, segmentation mIoU on val. The variants differ only after
the classification-only warm-up, so each seed runs the warm-up once and every variant continues
from a copy of its end state on the same batch order.

In-process on the training core the Ray workers run (`components/training/core.py`, with the
config's optimizer and schedule), on the same shards, `decode_weak_batch`, models,
`build_method`, `diagnose` and `predict_confusion`, so a dozen short runs do not each pay Ray
Train's start-up. Step time is the 25th percentile of
a run's step wall times after the warm-up (see benchmarks/synthetic_methods.py); the ratio is to
`afa`. Results: `--out` (JSON + Markdown).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_methods import step_times

from benchmarks.pretrained import CHOICES, pretrained_overrides
from components.config import Config, merge_config
from components.data.decode import decode_split
from components.data.shards import read_split_table
from components.data.synthetic import ensure_synthetic
from components.data.transforms import decode_weak_batch
from components.distillation.build import build_method
from components.metrics import miou
from components.models.build import build_model
from components.training.core import train_one_epoch
from components.training.evaluation import predict_confusion
from components.training.schedule import Schedule, build_optimizer
from components.weakly.diagnostics import diagnose, iter_rows

VARIANTS = {
    "afa": ["method.weakly.weights.scd=0", "method.weakly.refine=par"],
    "afa+varm": ["method.weakly.weights.scd=0", "method.weakly.refine=varm"],
    "afa+scd": ["method.weakly.refine=par"],
    "tscd": [],
}
CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tscd_synthetic.yaml")


def _batches(rows: dict, cfg: Config, num_classes: int, seed: int):
    """Batches in a seeded order with seeded augmentation (a run is reproducible)."""
    d, rng = cfg.data, np.random.default_rng(seed)
    n = len(rows["id"])
    epoch = 0
    while True:
        order = rng.permutation(n)
        for start in range(0, n - d.batch_size + 1, d.batch_size):
            idx = order[start : start + d.batch_size]
            batch = {k: np.array([v[i] for i in idx], dtype=object) for k, v in rows.items()}
            out = decode_weak_batch(
                batch,
                crop_size=d.crop_size,
                scale_range=(d.scale_min, d.scale_max),
                flip=d.flip,
                num_classes=num_classes,
                seed=seed * 100_003 + epoch,
            )
            yield {k: torch.from_numpy(v) for k, v in out.items() if k != "id"}
        epoch += 1


def _build(cfg: Config, k: int, iters: int):
    method = build_method(cfg, build_model(cfg.model, k), None, num_classes=k)
    optimizer = build_optimizer(method.trainable, cfg.optim)
    return method, optimizer, Schedule.of(optimizer, iters, cfg.optim)


def run_seed(cfgs: dict[str, Config], info, rows, val, iters: int, seed: int, diag_rows: int):
    """Every variant of one seed. The classification-only warm-up is the same computation in
    every variant (they differ only in the dense terms), so it runs once and each variant
    continues from a copy of its end state (network, optimizer, schedule, RNG) on the same
    dense-phase batch order. Yields (variant, result)."""
    k = info.num_classes
    warm = {c.method.weakly.warmup_iters for c in cfgs.values()}
    if len(warm) != 1:
        raise ValueError(f"the variants have different warm-ups: {sorted(warm)}")
    warm_iters = min(warm.pop(), iters)
    first = next(iter(cfgs.values()))
    torch.manual_seed(seed)
    method, optimizer, schedule = _build(first, k, iters)
    batches = _batches(rows, first, k, seed)
    t0 = time.perf_counter()
    warm = train_one_epoch(method, batches, optimizer, schedule, {"iteration": 0}, warm_iters)
    warm_s = time.perf_counter() - t0
    snapshot = copy.deepcopy(
        {
            "net": method.trainable.state_dict(),
            "opt": optimizer.state_dict(),
            "rng": torch.get_rng_state(),
        }
    )
    for name, cfg in cfgs.items():
        t0 = time.perf_counter()
        method, optimizer, schedule = _build(cfg, k, iters)
        method.trainable.load_state_dict(snapshot["net"])
        optimizer.load_state_dict(snapshot["opt"])
        torch.set_rng_state(snapshot["rng"])
        method.iteration = warm_iters
        batches = _batches(rows, cfg, k, seed + 1000)
        progress = {"iteration": warm_iters}
        stats = train_one_epoch(method, batches, optimizer, schedule, progress, iters - warm_iters)
        sums = {
            n: warm.sums.get(n, 0.0) + stats.sums.get(n, 0.0) for n in {*warm.sums, *stats.sums}
        }
        model = method.eval_model()
        d = cfg.data
        train = diagnose(
            model, iter_rows(d.root, d.train_split, k, diag_rows), k, cfg.method.weakly
        )
        confusion = predict_confusion(model, [val], k)
        total = float(confusion.sum())
        yield (
            name,
            {
                "val_miou": miou(confusion)[0],
                # per class (0 = background): IoU, share of val pixels predicted / true
                "val_class_iou": [round(float(v), 4) for v in miou(confusion)[1]],
                "val_pred_share": [round(float(v) / total, 4) for v in confusion.sum(0)],
                "val_true_share": [round(float(v) / total, 4) for v in confusion.sum(1)],
                "pseudo_miou": train["pseudo_miou"],
                "pseudo_labeled": train["pseudo_labeled"],
                "cam_miou": train["cam_miou"],
                "cls_map": train["cls_map"],
                "step_ms": step_times(stats)["step_ms"] if stats.step_s else float("nan"),
                "terms": {n: v / iters for n, v in sums.items()},
                "seed": seed,
                "warmup_s": warm_s,
                "wall_s": time.perf_counter() - t0,
            },
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--iters", type=int, default=None, help="default: the config's epochs")
    parser.add_argument("--diagnose-rows", type=int, default=256)
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
        found = pretrained_overrides(merge_config(CONFIG, args.overrides), ["model"])
        args.overrides = [*found, *args.overrides]
    base = merge_config(CONFIG, args.overrides)
    info = ensure_synthetic(base.data.root, base.data.synthetic)
    cols = ["id", "image", "mask", "image_labels"]
    rows = read_split_table(base.data.root, base.data.train_split, cols).to_pydict()
    decoded = decode_split(base.data.root, info, base.data.val_split)
    val = {k: torch.from_numpy(x) for k, x in decoded.items() if k != "id"}
    iters = args.iters or base.trainer.epochs * (len(rows["id"]) // base.data.batch_size)

    results: dict[str, list[dict]] = {}
    cfgs = {
        name: merge_config(CONFIG, [*args.overrides, *VARIANTS[name]]) for name in args.variants
    }
    for seed in args.seeds:
        for name, r in run_seed(cfgs, info, rows, val, iters, seed, args.diagnose_rows):
            results.setdefault(name, []).append(r)
            print(
                f"{name:10s} seed {seed}: val mIoU {100 * r['val_miou']:.2f}  pseudo mIoU "
                f"{100 * r['pseudo_miou']:.2f}  CAM mIoU {100 * r['cam_miou']:.2f}  cls mAP "
                f"{100 * r['cls_map']:.2f}  step {r['step_ms']:.0f} ms  (warm-up "
                f"{r['warmup_s']:.0f} s shared, then {r['wall_s']:.0f} s)",
                flush=True,
            )
    write_results(args, iters, results)


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def write_results(args, iters: int, results: dict) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ref = statistics.median(r["step_ms"] for r in results.get("afa", [{"step_ms": float("nan")}]))
    lines = [
        f"iterations {iters}, seeds {args.seeds}, overrides {args.overrides or 'none'}",
        "",
        "| variant | val mIoU | pseudo mIoU | CAM mIoU | cls mAP | step ms (p25) | × afa |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        step = statistics.median(r["step_ms"] for r in runs)
        lines.append(
            f"| {name} | {_mean_std([r['val_miou'] for r in runs])} | "
            f"{_mean_std([r['pseudo_miou'] for r in runs])} | "
            f"{_mean_std([r['cam_miou'] for r in runs])} | "
            f"{_mean_std([r['cls_map'] for r in runs])} | {step:.0f} | {step / ref:.2f} |"
        )
    (out / "wsss_synthetic.md").write_text("\n".join(lines) + "\n")
    (out / "wsss_synthetic.json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
