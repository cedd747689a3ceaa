"""Distil a segmentation student on a Ray cluster (any method; `method.name=none` trains plainly).

    python pipelines/distill.py                                   # embedded default (synthetic)
    python pipelines/distill.py model.pretrained=null teacher.model.pretrained=null   # from scratch
    python pipelines/distill.py --config configs/kd_synthetic.yaml trainer.num_workers=2
    ray job submit --working-dir . -- python pipelines/distill.py --config configs/....yaml

With no teacher checkpoint configured (`teacher.checkpoint`), a teacher is trained first with
`method: none` on the same data and cached under `trainer.storage_path`; later runs reuse it. Run
names are derived from the config, so running the same command again resumes an interrupted run
from its last checkpoint (full state: weights, optimizer, iteration, epoch, RNG, best mIoU).
"""

from __future__ import annotations

import sys

if __package__ in (None, ""):
    import _common  # noqa: F401  (puts the project root on sys.path)


def default_config():
    """The embedded default: Config's defaults (SSTKD, the synthetic dataset, a ResNet-18 x0.5
    teacher and x0.25 student), both backbones from the synthetic pretraining stage (made once
    and cached, as ImageNet weights are used in the papers; issue 21).
    configs/sstkd_synthetic.yaml spells it out."""
    import dataclasses

    from components.config import SYNTHETIC_PRETRAINED, Config

    cfg = Config()
    pre = {"pretrained": SYNTHETIC_PRETRAINED}
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, **pre),
        teacher=dataclasses.replace(
            cfg.teacher, model=dataclasses.replace(cfg.teacher.model, **pre)
        ),
    )


def summary_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def execute(cfg, info, args) -> str:
    """Obtain the teacher (configured, cached or trained here), distil, summarise."""
    from components.training.storage import join
    from components.training.trainer import fit, obtain_teacher, run_name, storage_of

    teacher = obtain_teacher(cfg, info)
    name = run_name(cfg)
    print(f"run: {name} (storage: {storage_of(cfg)})", flush=True)
    outcome = fit(cfg, info, name, teacher)
    if outcome.reused:
        print(f"run {name} had already finished; showing its last checkpoint", flush=True)

    m = outcome.metrics

    def pct(key: str) -> str:
        return f"{100 * m.get(key, float('nan')):.2f}"

    rows = []
    if teacher is not None:
        t = teacher.model
        rows.append((f"teacher ({t.backbone} x{t.width}, {t.head})", f"mIoU {pct('teacher_miou')}"))
    s = cfg.model
    rows += [
        (
            f"student ({s.backbone} x{s.width}, {s.head}, {cfg.method.name})",
            f"mIoU {pct('miou')} (best {pct('best_miou')} at epoch {m.get('best_epoch')})",
        ),
        ("training", f"{outcome.wall_s:.0f} s (this run)"),
        ("student images/s", f"{m.get('images_per_s', float('nan')):.1f} (last epoch)"),
        ("data wait share", f"{100 * m.get('data_wait_share', float('nan')):.1f}% of step time"),
        ("run folder", join(storage_of(cfg), name)),
        ("checkpoint (newest)", str(outcome.checkpoint_dir)),
        ("checkpoint (best)", join(storage_of(cfg), name, f"epoch_{m.get('best_epoch', 0):04d}")),
        ("logs", "report.md, metrics.jsonl, console.log, tensorboard/ in the run folder"),
        (
            "val predictions",
            join(storage_of(cfg), name, "panels") + "/ (image|truth|student|teacher)",
        ),
    ]
    return summary_table(rows)


def main(argv: list[str] | None = None) -> int:
    from components.regimes import SUPERVISED
    from pipelines._common import run_pipeline

    return run_pipeline(SUPERVISED, argv, __doc__, execute, default_config)


if __name__ == "__main__":
    sys.exit(main())
