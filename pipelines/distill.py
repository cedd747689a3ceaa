"""Distil a segmentation student on a Ray cluster (any method; `method.name=none` trains plainly).

    python pipelines/distill.py                                   # embedded default (synthetic)
    python pipelines/distill.py --config configs/kd_synthetic.yaml trainer.num_workers=2
    ray job submit --working-dir . -- python pipelines/distill.py --config configs/....yaml

With no teacher checkpoint configured (`teacher.checkpoint`), a teacher is trained first with
`method: none` on the same data and cached under `trainer.storage_path`; later runs reuse it. Run
names are derived from the config, so running the same command again resumes an interrupted run
from its last checkpoint (full state: weights, optimizer, LR schedule, epoch, RNG, best mIoU).
"""

from __future__ import annotations

import sys
import time

if __package__ in (None, ""):
    import _common  # noqa: F401  (puts the project root on sys.path)


def summary_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    from components.config import SEMISUP_METHODS, WEAKLY_METHODS, ConfigError, load_config
    from pipelines._common import fail, init_ray

    try:
        cfg = load_config(argv)
    except ConfigError as e:
        return fail(str(e))
    if cfg.method.name in SEMISUP_METHODS:
        return fail(
            f"'method.name': {cfg.method.name} is semi-supervised; run it with pipelines/semisup.py"
        )
    if cfg.method.name in WEAKLY_METHODS:
        return fail(
            f"'method.name': {cfg.method.name} is weakly supervised; run it with pipelines/wsss.py"
        )

    import ray.train

    from components.data.shards import DatasetError
    from components.training.checkpoint import CheckpointError
    from components.training.storage import check_writable, join
    from components.training.trainer import (
        failure_message,
        fit,
        obtain_teacher,
        prepare_dataset,
        run_name,
        storage_of,
    )

    start = time.perf_counter()
    try:
        check_writable(storage_of(cfg))  # before Ray starts or anything is trained
    except ConfigError as e:
        return fail(str(e))
    init_ray()
    try:
        info = prepare_dataset(cfg)
        teacher = obtain_teacher(cfg, info)
        name = run_name(cfg)
        print(f"run: {name} (storage: {cfg.trainer.storage_path})", flush=True)
        outcome = fit(cfg, info, name, teacher)
        if outcome.reused:
            print(f"run {name} had already finished; showing its last checkpoint", flush=True)
    except (ConfigError, DatasetError, CheckpointError) as e:
        return fail(str(e))
    except ray.train.TrainingFailedError as e:
        return fail(f"training failed: {failure_message(e)}", code=1)

    m = outcome.metrics
    rows = []
    if teacher is not None:
        t = teacher.model
        rows.append(
            (
                f"teacher ({t.backbone} x{t.width}, {t.head})",
                f"mIoU {100 * m.get('teacher_miou', float('nan')):.2f}",
            )
        )
    s = cfg.model
    rows += [
        (
            f"student ({s.backbone} x{s.width}, {s.head}, {cfg.method.name})",
            (
                f"mIoU {100 * m.get('miou', float('nan')):.2f} (best {100 * m.get('best_miou', float('nan')):.2f}"
                f" at epoch {m.get('best_epoch')})"
            ),
        ),
        (
            "wall time",
            f"{time.perf_counter() - start:.0f} s (this run's training {outcome.wall_s:.0f} s)",
        ),
        ("student images/s", f"{m.get('images_per_s', float('nan')):.1f} (last epoch)"),
        ("data wait share", f"{100 * m.get('data_wait_share', float('nan')):.1f}% of step time"),
        ("run folder", join(storage_of(cfg), name)),
        ("checkpoint", str(outcome.checkpoint_dir)),
    ]
    print("\n" + summary_table(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
