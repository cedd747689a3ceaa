"""Sweep distillation hyper-parameters (loss weights, DTIEM levels, ...) with Ray Tune.

    python pipelines/tune.py                                           # embedded default sweep
    python pipelines/tune.py --config configs/tune_sstkd_synthetic.yaml sweep.num_samples=8
    ray job submit --working-dir . -- python pipelines/tune.py --config configs/tune_....yaml

A sweep file names a distill config (`distill:`), fixed `overrides:`, the `search:` space in
distill's dotted keys (`method.weights.structural: loguniform(0.1, 10)`) and the `sweep:` settings
(components/tuning/space.py lists them). Everything is validated before any trial starts. The
teacher is trained (or reused) once and shared by every trial. Running the same command again
continues an interrupted sweep. Results: trials.csv, trials.md, params.png and best.yaml in
`<storage>/<sweep name>/`.
"""

from __future__ import annotations

import dataclasses
import sys
import time

if __package__ in (None, ""):
    import _common  # noqa: F401  (puts the project root on sys.path)


def main(argv: list[str] | None = None) -> int:
    from components.config import ConfigError, parse_args
    from components.tuning.space import load_sweep
    from pipelines._common import fail, init_ray, quiet_environment

    path, overrides = parse_args(argv, __doc__.splitlines()[0])
    try:
        spec = load_sweep(path, overrides)
    except ConfigError as e:
        return fail(str(e))

    import ray.train
    from ray.tune import TuneError

    from components.data.shards import DatasetError
    from components.training.checkpoint import CheckpointError
    from components.training.pretrain import resolve_pretrained
    from components.training.sweep import check_sweep, run_sweep
    from components.training.trainer import failure_message, obtain_teacher, prepare_dataset

    start = time.perf_counter()
    quiet_environment(spec.base.trainer.verbose)
    init_ray(dashboard=True)
    try:
        check_sweep(spec)  # before minutes of teacher training
        info = prepare_dataset(spec.base)
        teacher = obtain_teacher(spec.base, info)
        if teacher is not None and not spec.base.teacher.checkpoint:
            # Every trial (and best.yaml) uses this teacher rather than training its own.
            spec.base = dataclasses.replace(
                spec.base,
                teacher=dataclasses.replace(spec.base.teacher, checkpoint=teacher.source),
            )
        # `model.pretrained: synthetic`: pretrained (or found) once here, not in every trial
        spec.base = resolve_pretrained(spec.base)
        outcome = run_sweep(spec, info, teacher)
    except (ConfigError, DatasetError, CheckpointError) as e:
        return fail(str(e))
    except (TuneError, ray.train.TrainingFailedError) as e:
        return fail(f"sweep failed: {failure_message(e)}", code=1)

    keys = list(spec.search)
    print(
        f"\nsweep {outcome.path}: {len(outcome.rows)} trials in {time.perf_counter() - start:.0f} s"
    )
    head = f"{'rank':>4}  {'trial':<12} {'mIoU':>6}  {'epochs':>6}  {'status':<14}" + "".join(
        f"  {k}" for k in keys
    )
    print(head)
    for r in outcome.rows:
        miou = "" if r.get("best_miou") is None else f"{100 * r['best_miou']:.2f}"
        values = "".join(f"  {_short(r.get(k))}" for k in keys)
        print(
            f"{r['rank']:>4}  {r['trial_id']:<12} {miou:>6}  {r['epochs']:>6}  {r['status']:<14}{values}"
        )
    errors = [r for r in outcome.rows if r["status"] == "error"]
    for r in errors:
        print(f"trial {r['trial_id']} failed: {r.get('error')}", file=sys.stderr)
    if outcome.best_yaml:
        from components.regimes import regime_of

        script = regime_of(spec.base.method.name).pipeline  # semisup.py for a semisup sweep
        print(f"\nbest config: {outcome.best_yaml}\n  python {script} --config {outcome.best_yaml}")
    if errors:
        return fail(f"{len(errors)} trial(s) failed; see {outcome.path}", code=1)
    return 0


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    sys.exit(main())
