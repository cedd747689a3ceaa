"""The semi-supervised benchmark (issue 8): 1/8 and 1/32 labeled, five variants, three seeds.

    python benchmarks/semisup_synthetic.py                                 # the full table
    python benchmarks/semisup_synthetic.py --fractions 8 --seeds 0 --iters 100   # a quick look

Variants: supervised-only (the labeled images alone), the FixMatch/mean-teacher base, base +
relation, base + style, base + both (cross_image). One synthetic dataset (512 train images); for
1/k labeled a seeded random 512/k of them keep their masks (`data.labeled_count`, the same
choice the Ray pipeline makes) and the rest are unlabeled. Every run has the same number of
steps; semi-supervised steps draw one labeled and one unlabeled batch (batch 8 + 8).

In-process on the training core the Ray workers run (`components/training/core.py`, with the
config's optimizer and schedule), on the same shards, transforms (incl. the strong views),
models, `build_method` and `predict_confusion`, so 30 short runs do not each pay Ray Train's
start-up. Step time is the 25th percentile of a run's step wall times (see
benchmarks/synthetic_methods.py); the ratio is to the base. Results: `--out` (JSON + Markdown).
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_methods import Data, step_times

from benchmarks.pretrained import CHOICES, pretrained_overrides
from components.config import Config, merge_config
from components.data.semisup_plan import labeled_selection
from components.data.transforms import decode_train_batch, decode_unlabeled_batch
from components.distillation.build import build_method
from components.models.build import build_model
from components.regimes import SEMI_SUPERVISED, regime_of
from components.training.core import train_one_epoch
from components.training.schedule import Schedule, build_optimizer

VARIANTS = {
    "supervised": ["method.name=none"],
    "base": ["method.name=fixmatch"],
    "base+relation": ["method.name=cross_image", "method.semisup.weights.style=0"],
    "base+style": ["method.name=cross_image", "method.semisup.weights.relation=0"],
    "base+both": ["method.name=cross_image"],
}
DEFAULTS = [
    "data.root=data/synthetic",  # 512 train / 64 val, the distill default's dataset
    "method.semisup.ema_momentum=0.99",
]


def _batches(rows: dict, cfg: Config, order_seed: int, decode, **kwargs):
    d, rng = cfg.data, np.random.default_rng(order_seed)
    n = len(rows["id"])
    epoch = 0
    while True:
        order = rng.permutation(n)
        for start in range(0, n - d.batch_size + 1, d.batch_size):
            idx = order[start : start + d.batch_size]
            part = {k: np.array([v[i] for i in idx], dtype=object) for k, v in rows.items()}
            yield decode(
                part,
                crop_size=d.crop_size,
                scale_range=(d.scale_min, d.scale_max),
                flip=d.flip,
                **kwargs,
            )
        epoch += 1


def split_rows(data: Data, cfg: Config) -> tuple[dict, dict]:
    ids, _ = labeled_selection(cfg.data, data.info)
    keep = np.array([i in ids for i in data.train["id"]])
    pick = lambda mask: {k: [v[i] for i in np.flatnonzero(mask)] for k, v in data.train.items()}
    return pick(keep), pick(~keep)


def _steps(cfg: Config, labeled: dict, unlabeled: dict, seed: int, k: int):
    """Training batches: labeled (image, mask, valid) and, for a semi-supervised method, the
    unlabeled stream's weak and strong views under `u_` keys."""
    lab = _batches(labeled, cfg, seed, decode_train_batch, seed=seed, num_classes=k)
    semi = regime_of(cfg.method.name) is SEMI_SUPERVISED
    unl = _batches(
        unlabeled, cfg, seed + 7, decode_unlabeled_batch, strong=cfg.method.semisup.strong,
        num_classes=k, seed=seed + 7,
    )  # fmt: skip
    while True:
        part = next(lab)
        batch = {key: torch.from_numpy(part[key]) for key in ("image", "mask", "valid")}
        if semi:
            u = next(unl)
            keys = ("image", "image_strong", "area", "mask", "valid")
            batch.update({f"u_{key}": torch.from_numpy(u[key]) for key in keys})
        yield batch


def run(cfg: Config, data: Data, labeled: dict, unlabeled: dict, iters: int, seed: int) -> dict:
    torch.manual_seed(seed)
    k = data.info.num_classes
    method = build_method(cfg, build_model(cfg.model, k), None, num_classes=k)
    optimizer = build_optimizer(method.trainable, cfg.optim)
    schedule = Schedule.of(optimizer, iters, cfg.optim)
    batches = _steps(cfg, labeled, unlabeled, seed, k)
    stats = train_one_epoch(method, batches, optimizer, schedule, {"iteration": 0}, iters)
    return {
        "miou": data.val_miou(method.eval_model()),
        **step_times(stats),
        "terms": stats.means(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--fractions", nargs="*", type=int, default=[8, 32], help="1/k labeled")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--iters", type=int, default=300)
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
        found = pretrained_overrides(merge_config(None, [*DEFAULTS, *args.overrides]), ["model"])
        args.overrides = [*found, *args.overrides]
    base = merge_config(None, [*DEFAULTS, *args.overrides])
    data = Data(base)
    total = data.info.splits["train"].rows
    results: dict[str, dict[str, list[dict]]] = {}
    for frac in args.fractions:
        for seed in args.seeds:
            # The labeled subset follows the seed too (data.shuffle_seed).
            split_cfg = merge_config(
                None,
                [
                    *DEFAULTS,
                    *args.overrides,
                    f"data.labeled_count={total // frac}",
                    f"data.shuffle_seed={seed}",
                ],
            )
            labeled, unlabeled = split_rows(data, split_cfg)
            for name in args.variants:
                cfg = merge_config(None, [*VARIANTS[name]], split_cfg)
                t0 = time.perf_counter()
                r = run(cfg, data, labeled, unlabeled, args.iters, seed)
                r["seed"], r["wall_s"] = seed, time.perf_counter() - t0
                results.setdefault(f"1/{frac}", {}).setdefault(name, []).append(r)
                print(
                    f"1/{frac} {name:14s} seed {seed}: mIoU {100 * r['miou']:.2f}  "
                    f"step {r['step_ms']:.1f} ms  ({r['wall_s']:.0f} s)  "
                    + " ".join(f"{k} {v:.3f}" for k, v in r["terms"].items()),
                    flush=True,
                )
    write_results(args, total, results)


def write_results(args, total: int, results: dict) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        (
            f"Synthetic dataset, {total} train images; {args.iters} steps per run (batch 8 labeled "
            f"+ 8 unlabeled), seeds {args.seeds}."
        ),
        "",
        "| labeled | variant | val mIoU (mean ± std) | step ms (25th pct.) | step / base |",
        "|---|---|---|---|---|",
    ]
    for frac, variants in results.items():
        base = variants.get("base")
        ref = statistics.median(r["step_ms"] for r in base) if base else float("nan")
        for name, runs in variants.items():
            m = [100 * r["miou"] for r in runs]
            std = statistics.stdev(m) if len(m) > 1 else 0.0
            step = statistics.median(r["step_ms"] for r in runs)
            lines.append(
                f"| {frac} ({total // int(frac.split('/')[1])}) | {name} | "
                f"{statistics.mean(m):.2f} ± {std:.2f} | {step:.1f} | {step / ref:.2f} |"
            )
    (out / "semisup_synthetic.md").write_text("\n".join(lines) + "\n")
    (out / "semisup_synthetic.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
