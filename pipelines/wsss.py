"""Weakly supervised segmentation from image-level labels: TSCD (SCD + VARM) on AFA.

    python pipelines/wsss.py                                       # embedded default (synthetic)
    python pipelines/wsss.py --config configs/tscd_voc_mitb1.yaml
    python pipelines/wsss.py --config configs/tscd_synthetic.yaml method.weakly.weights.scd=0 \\
        method.weakly.refine=par                                   # the AFA baseline
    ray job submit --working-dir . -- python pipelines/wsss.py --config configs/tscd_voc_mitb1.yaml

The training rows stream from the shards' `image_labels` (Ray Data) into Ray Train workers; the
masks are never a training target. Checkpoints, resume (same command, same run name) and
`pipelines/evaluate.py` work as for the other pipelines. After training, the last checkpoint is
diagnosed in this process on the first `--diagnose-rows` rows of the train split against their
masks (CAM mIoU, pseudo-label mIoU) and of val (classification mAP and accuracy); the
segmentation mIoU on val is the run's own evaluation (the whole split, on the workers).
"""

from __future__ import annotations

import sys

if __package__ in (None, ""):
    import _common  # noqa: F401  (puts the project root on sys.path)


def default_config():
    """The embedded default: TSCD on a half-width MiT-B0 and 64 px synthetic images."""
    from components.config import (
        SYNTHETIC_PRETRAINED,
        Config,
        DataConfig,
        MethodConfig,
        ModelConfig,
        OptimConfig,
        SyntheticConfig,
        TrainerConfig,
        WeaklyConfig,
    )

    return Config(
        data=DataConfig(
            root="data/synthetic_wsss",
            synthetic=SyntheticConfig(num_train=1024, num_val=64, size=64),
            crop_size=64,
            scale_min=0.75,
            scale_max=1.25,
            batch_size=8,
        ),
        model=ModelConfig(
            backbone="mit_b0",
            head="segformer",
            width=0.5,
            output_stride=8,
            cls_head=True,
            drop_path=0.0,
            pretrained=SYNTHETIC_PRETRAINED,  # the synthetic pretraining stage (issue 21)
        ),
        method=MethodConfig(name="tscd", weakly=WeaklyConfig(warmup_iters=1024)),
        optim=OptimConfig(
            name="adamw",
            lr=3e-4,
            head_lr_mult=1.0,
            weight_decay=0.01,
            poly_power=1.0,
            warmup_iters=32,
        ),
        trainer=TrainerConfig(epochs=12),
    )


def add_arguments(parser) -> None:
    parser.add_argument(
        "--diagnose-rows",
        type=int,
        default=512,
        help="rows of train (CAM / pseudo-label mIoU) and of val (classification) diagnosed "
        "after training, in this process (0: skip)",
    )


def diagnose_run(cfg, info, checkpoint_dir: str, rows: int) -> dict:
    """CAM / pseudo-label mIoU on train, classification on val, of a run's checkpoint."""
    import torch

    from components.config import from_dict
    from components.models.build import architecture, build_model
    from components.training.checkpoint import load_model_state
    from components.weakly.diagnostics import diagnose, iter_rows

    state, meta = load_model_state(checkpoint_dir)
    model = build_model(architecture(from_dict({"model": meta["model"]}).model), info.num_classes)
    model.load_state_dict(state)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    d, k = cfg.data, info.num_classes
    train = diagnose(
        model,
        iter_rows(d.root, d.train_split, k, rows, info.ignore_index),
        k,
        cfg.method.weakly,
        info.ignore_index,
    )
    val = diagnose(
        model,
        iter_rows(d.root, d.val_split, k, rows, info.ignore_index),
        k,
        cfg.method.weakly,
        info.ignore_index,
    )
    return {"train": train, "val": val}


def report(name: str, metrics: dict, diag: dict | None, storage: str) -> str:
    from components.training.storage import join

    def pct(value) -> str:
        return "-" if value is None else f"{100 * value:.2f}"

    lines = [f"run {name}: {join(storage, name)}"]
    lines.append(
        f"  val segmentation mIoU  {pct(metrics.get('miou'))}  (best {pct(metrics.get('best_miou'))}"
        f" at epoch {metrics.get('best_epoch')}, {metrics.get('iteration')} iterations)"
    )
    if diag is not None:
        t, v = diag["train"], diag["val"]
        lines += [
            f"  train CAM mIoU         {pct(t['cam_miou'])}  ({t['images']} images, no refinement)",
            (
                f"  train pseudo mIoU      {pct(t['pseudo_miou'])}  (on the "
                f"{pct(t['pseudo_labeled'])}% of pixels not left ignore)"
            ),
            f"  val classification     mAP {pct(v['cls_map'])}  accuracy {pct(v['cls_accuracy'])}",
            f"  train classification   mAP {pct(t['cls_map'])}  accuracy {pct(t['cls_accuracy'])}",
        ]
    bad = metrics.get("bad_rows")
    if bad is not None:
        share = metrics.get("background_only_share")
        lines.append(
            f"  bad training rows (last epoch) {bad}"
            + ("" if share is None else f"; background-only images {pct(share)}%")
        )
    return "\n".join(lines)


def execute(cfg, info, args) -> str:
    """Train (or resume) the run, then diagnose its last checkpoint."""
    from components.training.trainer import fit, run_name, storage_of
    from components.weakly.data import check_image_labels

    check_image_labels(cfg.data.root, cfg.data.train_split, info.num_classes)
    name = run_name(cfg)
    print(f"run: {name} (storage: {storage_of(cfg)})", flush=True)
    outcome = fit(cfg, info, name)
    if outcome.reused:
        print(f"run {name} had already finished; showing its last checkpoint", flush=True)
    diag = None
    if args.diagnose_rows > 0 and outcome.checkpoint_dir is not None:
        diag = diagnose_run(cfg, info, outcome.checkpoint_dir, args.diagnose_rows)
    return report(name, outcome.metrics, diag, storage_of(cfg))


def main(argv: list[str] | None = None) -> int:
    from components.regimes import WEAKLY
    from pipelines._common import run_pipeline

    return run_pipeline(WEAKLY, argv, __doc__, execute, default_config, add_arguments=add_arguments)


if __name__ == "__main__":
    sys.exit(main())
