"""Semi-supervised segmentation: cross-image relation and style distillation on a mean teacher.

    python pipelines/semisup.py                          # embedded default: three runs compared
    python pipelines/semisup.py --config configs/cross_image_voc_1464_r101.yaml
    python pipelines/semisup.py --config configs/cross_image_synthetic.yaml --baselines
    ray job submit --working-dir . -- python pipelines/semisup.py --config configs/....yaml

A labeled and an unlabeled Ray dataset stream into the same Ray Train workers; each step draws
one labeled and one unlabeled batch (an epoch is one pass over the larger stream, the smaller one
repeats). `method.name` is `cross_image` (base + relation + style) or `fixmatch` (the base:
EMA-teacher pseudo labels on strong views). The EMA teacher is part of every checkpoint, and the
run name is derived from the config, so the same command resumes an interrupted run.

With no `--config` (the embedded default, on the synthetic dataset: 64 labeled, 448 unlabeled
images), or with `--baselines`, three runs are made and compared on the validation split:
supervised-only on the labeled images (as many steps), the base, and the configured method.
"""

from __future__ import annotations

import dataclasses
import math
import sys

if __package__ in (None, ""):
    import _common  # noqa: F401  (puts the project root on sys.path)


def default_config():
    """The embedded default: the synthetic dataset, 1/8 labeled, 11 epochs of 56 steps (616: this
    dataset needs some 500 steps before a student leaves the background prior)."""
    from components.config import (
        SYNTHETIC_PRETRAINED,
        Config,
        DataConfig,
        MethodConfig,
        SemiSupConfig,
        SyntheticConfig,
        TrainerConfig,
    )

    return Config(
        data=DataConfig(
            root="data/synthetic_semisup",
            synthetic=SyntheticConfig(num_train=64, num_unlabeled=448, num_val=64),
        ),
        # Config's student (ResNet-18 x0.25), from the synthetic pretraining stage
        model=dataclasses.replace(Config().model, pretrained=SYNTHETIC_PRETRAINED),
        method=MethodConfig(name="cross_image", semisup=SemiSupConfig(ema_momentum=0.99)),
        trainer=TrainerConfig(epochs=11),
    )


def add_arguments(parser) -> None:
    parser.add_argument(
        "--baselines",
        action="store_true",
        help="also train supervised-only and the base, and compare (the default without --config)",
    )


def comparison(cfg, labeled_rows: int, steps_per_epoch: int) -> list[tuple[str, object]]:
    """(label, config) of the runs to compare: supervised-only on the labeled images alone (as
    many steps per epoch: the labeled split repeated, `data.train_repeat`, and the same label
    weights), the base (fixmatch), the configured method."""
    from components.config import MethodConfig
    from components.regimes import SEMI_SUPERVISED

    per_pass = cfg.data.batch_size * cfg.trainer.num_workers
    w = SEMI_SUPERVISED.weights(cfg)
    sup = dataclasses.replace(
        cfg,
        data=dataclasses.replace(
            cfg.data, train_repeat=max(1, math.ceil(steps_per_epoch * per_pass / labeled_rows))
        ),
        method=MethodConfig(name="none", weights={"ce": w["ce"], "aux": w["aux"]}),
    )
    # The base: the same labeled terms and unsup, without the method's other terms.
    ss = cfg.method.semisup
    base_weights = {k: v for k, v in ss.weights.items() if k in ("ce", "aux", "unsup")}
    base = dataclasses.replace(
        cfg,
        method=dataclasses.replace(
            cfg.method, name="fixmatch", semisup=dataclasses.replace(ss, weights=base_weights)
        ),
    )
    runs = [("supervised only", sup), ("base (fixmatch)", base)]
    if cfg.method.name != "fixmatch":
        runs.append((f"base + {cfg.method.name}", cfg))
    return runs


def execute(cfg, info, args) -> str:
    """The configured run, or (with --baselines, or the embedded default) the three compared."""
    from components.data.semisup_plan import plan_semisup, semisup_steps
    from components.regimes import SUPERVISED, regime_of
    from components.training.trainer import fit, run_name, storage_of

    plan = plan_semisup(cfg.data, info)
    steps, _, _ = semisup_steps(plan, cfg.data, cfg.trainer.num_workers)
    print(f"data: {plan.describe(cfg.data)}; {steps} steps per epoch", flush=True)
    runs = [(f"{cfg.method.name}", cfg)]
    if args.baselines or not args.config:
        runs = comparison(cfg, plan.labeled_rows, steps)
    results = []
    for label, run_cfg in runs:
        baseline = regime_of(run_cfg.method.name) is SUPERVISED
        name = run_name(run_cfg, prefix="semisup-supervised" if baseline else None)
        print(f"run: {label}: {name} (storage: {storage_of(run_cfg)})", flush=True)
        outcome = fit(run_cfg, info, name)
        if outcome.reused:
            print(f"run {name} had already finished; showing its last checkpoint", flush=True)
        results.append((label, run_cfg, name, outcome))
    return report(results, storage_of(cfg))


def main(argv: list[str] | None = None) -> int:
    from components.regimes import SEMI_SUPERVISED
    from pipelines._common import run_pipeline

    return run_pipeline(
        SEMI_SUPERVISED, argv, __doc__, execute, default_config, add_arguments=add_arguments
    )


def report(results: list, storage: str) -> str:
    from components.training.storage import join

    def pct(value) -> str:
        return "-" if value is None else f"{100 * value:.2f}"

    header = ("run", "val mIoU", "best (epoch)", "iterations", "confident", "pseudo acc", "train s")
    rows = [header]
    for label, run_cfg, _, outcome in results:
        m = outcome.metrics
        rows.append(
            (
                label,
                pct(m.get("miou")),
                f"{pct(m.get('best_miou'))} ({m.get('best_epoch')})",
                str(m.get("iteration", "-")),
                pct(m.get("confident_share")),
                pct(m.get("pseudo_acc")),
                f"{outcome.wall_s:.0f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines += [f"  {label}: {join(storage, name)}" for label, _, name, _ in results]
    lines.append(
        "  (confident: share of unlabeled pixels with a pseudo label, last epoch; pseudo acc: "
        "their accuracy against the unlabeled masks, a diagnostic only)"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
