"""Ray Tune around distill's trainer: one trial = one TorchTrainer run (the Train V2 pattern).

    outcome = run_sweep(spec, info, teacher)    # spec from components.tuning.space.load_sweep

Tune runs a small driver function per trial (`_trial`); it builds the trial's distill config from
the sampled values and fits a TorchTrainer whose `TuneReportCallback` forwards rank 0's per-epoch
metrics (val `miou`, `epoch`, ...) to Tune, so the scheduler (ASHA by default) can stop poor
trials after any epoch. The sweep's folder is `<storage>/<sweep name>/`; each trial's Train run
is `runs/train-<sample>-<hash of its values>/` in it, a name that is the same on every start.

Continuing a sweep never unpickles anything from storage. Tune's own restore (`Tuner.restore`)
loads `tuner.pkl` and pickled trial states from the sweep folder, so anyone who can write that
folder (a shared bucket) could run code on the driver. Running the same command again instead
starts a new Tune experiment (`tune-NNN/`) with the same seeded search: it draws the same
trials in the same order, and each trial finds its Train run by name. A run that finished, or
that the scheduler stopped (`stopped_early.json`, written by the driver), replays its recorded
per-epoch rows (`metrics.jsonl`, plain JSON) to Tune and returns; an unfinished one resumes from
its last checkpoint (weights only). This needs a seeded search (`sweep.seed`, default 0).

Outputs in the sweep's folder: trials.csv, trials.md, params.png and best.yaml (a complete distill
config: `python pipelines/distill.py --config best.yaml` runs it as is).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Any

from ray import tune
from ray._common.constants import HEAD_NODE_RESOURCE_NAME  # what Train V2 itself pins to the head

from components.config import ConfigError, to_yaml
from components.data.shards import DatasetInfo, resolve_fs, write_atomic
from components.training.checkpoint import newest_verified, read_meta
from components.training.progress import Bar, wants_bars
from components.training.report import read_rows
from components.training.resources import cluster_capacity, run_request
from components.training.storage import check_writable, is_uri
from components.training.trainer import (
    Teacher,
    absolute_storage,
    build_trainer,
    failure_message,
    finished_checkpoint,
    storage_of,
)
from components.tuning.distributions import Distribution
from components.tuning.report import plot_png, rank_rows, to_csv, to_markdown
from components.tuning.space import SweepSpec, identity


@dataclass
class SweepOutcome:
    path: str  # the sweep's folder
    rows: list[dict]  # ranked, best first
    best_yaml: str | None
    wall_s: float


SAMPLE_KEY = "sample"  # the sample index, a grid dimension of the param space
STOPPED_FILE = "stopped_early.json"


def trial_run_name(config: dict) -> str:
    """A trial's Train run: its sample index and a hash of its sampled values (`config` is
    the trial's Tune config). The seeded search draws the same values on every start."""
    values = json.dumps(config.get("params", {}), sort_keys=True, default=float)
    digest = hashlib.sha256(values.encode()).hexdigest()[:8]
    return f"train-{int(config.get(SAMPLE_KEY, 0)):03d}-{digest}"


def sweep_paths(spec: SweepSpec) -> tuple[str, str]:
    """(storage, sweep name): the sweep lives in `<storage>/<name>`."""
    s = spec.settings
    return absolute_storage(s.storage_path or spec.base.trainer.storage_path), s.name or "sweep"


def check_sweep(spec: SweepSpec) -> int:
    """Everything about a sweep that can fail before a teacher or a trial is trained: the
    samplers, the concurrency the cluster allows, and, for a sweep folder that exists, that it
    holds this same sweep. Returns the concurrency. Raises ConfigError."""
    for key, dist in spec.search.items():
        try:
            to_tune(dist)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{spec.source}: search '{key}': {dist.text()}: {e}") from e
    if spec.base.trainer.local_mode:
        raise ConfigError(
            f"{spec.source}: 'trainer.local_mode': a trial trains in Ray Train's workers (its "
            "driver reserves no CPU for training); leave it unset or false in a sweep"
        )
    limit = concurrency(spec)
    storage, name = sweep_paths(spec)
    check_writable(storage, key="sweep.storage_path")
    if storage_of(spec.base) != storage:  # where the teacher is trained and cached
        check_writable(storage_of(spec.base))
    saved = _read_identity(f"{storage}/{name}")
    if saved is not None:
        mine = json.loads(json.dumps(identity(spec)))
        diff = [k for k in mine if saved.get(k) != mine[k]]
        if diff:
            raise ConfigError(
                f"{storage}/{name} holds a different sweep ({', '.join(diff)} differ); running "
                "the same command continues a sweep: set another sweep.name for a new one"
            )
    return limit


def _read_identity(path: str) -> dict | None:
    fs, p = resolve_fs(f"{path}/{IDENTITY_FILE}")
    try:
        with fs.open_input_stream(p) as f:
            return json.loads(f.read().decode())
    except (FileNotFoundError, OSError):
        return None


IDENTITY_FILE = "sweep_identity.json"


def to_tune(dist: Distribution):
    """The Ray Tune sampler of a parsed distribution."""
    a = dist.args
    match dist.name:
        case "uniform":
            return tune.uniform(a[0], a[1])
        case "loguniform":
            return tune.loguniform(a[0], a[1])
        case "quniform":
            return tune.quniform(a[0], a[1], a[2])
        case "qloguniform":
            return tune.qloguniform(a[0], a[1], a[2])
        case "randint":
            return tune.randint(a[0], a[1])
        case "qrandint":
            return tune.qrandint(a[0], a[1], a[2])
        case "choice":
            return tune.choice(list(a[0]))
        case "grid":
            return tune.grid_search(list(a[0]))
    raise ValueError(f"unknown distribution {dist.name}")


def driver_resources(cpus: float) -> dict[str, float]:
    """What a trial's driver asks Tune for: `cpus` CPUs, or with 0 a sliver of the head node's
    own resource (Tune needs some resource in the request; the head is where Train puts the
    run's controller too)."""
    return {"CPU": cpus} if cpus > 0 else {"CPU": 0, HEAD_NODE_RESOURCE_NAME: 0.001}


def concurrency(spec: SweepSpec) -> int:
    """Trials at once: as many as the cluster can give all their workers to (each TorchTrainer
    needs every worker at the same time, while Tune only sees the small driver), at least 1.
    On CPU a trial also needs one CPU for its Ray Data decode tasks, or it would wait forever."""
    if spec.settings.max_concurrent_trials is not None:
        return spec.settings.max_concurrent_trials
    cluster = cluster_capacity()  # an autoscaling cluster's maximum, else what it has now
    request = run_request(spec.base.trainer, cluster.get("GPU", 0) > 0)
    kind = "GPU" if request.use_gpu else "CPU"
    need, have = request.totals[kind], cluster.get(kind, 0)
    if kind == "CPU":
        need += spec.settings.driver_cpus
    if need > have:
        raise ConfigError(
            f"one trial needs {need:g} {kind}s "
            f"(trainer.num_workers={spec.base.trainer.num_workers}) but the cluster has {have:g}; "
            "lower trainer.num_workers or set sweep.max_concurrent_trials on an autoscaling "
            "cluster"
        )
    return max(1, int(have // need))


def _trial(config: dict, spec: SweepSpec, info: DatasetInfo, teacher: Teacher | None, runs: str):
    """One trial: distill with the sampled values; metrics reach Tune through the callback. A
    run that finished or was stopped before (an earlier start of this sweep) replays its rows."""
    from ray.tune.integration.ray_train import TuneReportCallback

    name = trial_run_name(config)
    cfg = spec.trial_config(config["params"])
    cfg = dataclasses.replace(
        cfg, trainer=dataclasses.replace(cfg.trainer, storage_path=runs, name=name)
    )
    done = finished_checkpoint(runs, name, cfg.trainer.epochs)
    if done is None and _exists(f"{runs}/{name}/{STOPPED_FILE}"):
        done = newest_verified(f"{runs}/{name}") if not is_uri(runs) else None
    if done is not None:
        rows = read_rows(f"{runs}/{name}", "metrics.jsonl") or [read_meta(done).get("metrics", {})]
        for row in rows:  # what Tune saw the first time, epoch by epoch
            tune.report({**row, "checkpoint_path": str(done)})
        return
    build_trainer(cfg, info, name, teacher, callbacks=[TuneReportCallback()]).fit()


def _exists(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, p = resolve_fs(path)
    return fs.get_file_info(p).type == pafs.FileType.File


class TrialProgress(tune.Callback):
    """The sweep's progress on the driver: a bar of finished trials (done, running, stopped
    early, failed) on a terminal, else one line per finished trial."""

    def __init__(self, total: int, epochs: int, metric: str, bars: bool, runs: str = "", log=print):
        self.total, self.epochs, self.metric, self.log = total, epochs, metric, log
        self.runs = runs
        self.running: set[str] = set()
        self.counts = {"done": 0, "stopped early": 0, "failed": 0}
        self.bars = bars
        self.bar = Bar("", None, enabled=False)  # drawn from `setup`, when the sweep starts

    def __getstate__(self) -> dict:
        """Tune pickles its callbacks into tuner.pkl: not the bar, nor `log` (print may be
        tqdm_ray's replacement, which does not pickle)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("bar", "log")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, bar=Bar("", None, enabled=False), log=print)

    def setup(self, **info) -> None:
        self.bar = Bar(self._desc(), self.total, "trial", enabled=self.bars)

    def _desc(self) -> str:
        c = self.counts
        return (
            f"trials: {c['done']} done, {len(self.running)} running, "
            f"{c['stopped early']} stopped early, {c['failed']} failed"
        )

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self.bar.update(0, desc=self._desc())

    def _finished(self, trial, status: str) -> None:
        self.running.discard(trial.trial_id)
        self.counts[status] += 1
        self.bar.update(1, desc=self._desc())
        if not self.bars:
            result = trial.last_result or {}
            value = result.get(self.metric)
            shown = "" if value is None else f" {self.metric} {value:.4f}"
            finished = sum(self.counts.values())
            self.log(
                f"trial {trial_run_name(trial.config)[6:]} {status} after epoch "
                f"{result.get('epoch', 0)}"
                f"{shown} ({finished}/{self.total} finished)"
            )

    def on_trial_complete(self, iteration, trials, trial, **info):
        epoch = (trial.last_result or {}).get("epoch", 0)
        stopped = epoch < self.epochs
        if stopped and self.runs:  # a later start of the sweep must not train it on
            marker = f"{self.runs}/{trial_run_name(trial.config)}/{STOPPED_FILE}"
            _write(marker, json.dumps({"epoch": epoch}))
        self._finished(trial, "stopped early" if stopped else "done")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finished(trial, "failed")

    def on_experiment_end(self, trials, **info):
        self.bar.close()


def _scheduler(spec: SweepSpec):
    s = spec.settings
    if s.scheduler == "fifo":
        return tune.schedulers.FIFOScheduler()
    return tune.schedulers.ASHAScheduler(
        time_attr="epoch",  # the run's own epoch: right across resumed Train runs
        max_t=spec.base.trainer.epochs,
        grace_period=min(s.grace_period, spec.base.trainer.epochs),
        reduction_factor=s.reduction_factor,
    )


def _row(result, spec: SweepSpec, statuses: dict[str, str]) -> dict[str, Any]:
    params = (result.config or {}).get("params", {})
    tune_id = result.path.rstrip("/").rsplit("trial-", 1)[-1] if result.path else "?"
    trial_id = trial_run_name(result.config or {})[len("train-") :]  # the same on every start
    row: dict[str, Any] = {"trial_id": trial_id, **{k: params.get(k) for k in spec.search}}
    df = result.metrics_dataframe
    metric, reported = spec.settings.metric, df is not None and len(df) > 0
    row["score"] = row["best_miou"] = None
    row["epochs"] = int(df["epoch"].max()) if reported and "epoch" in df else 0
    if reported and metric in df and df[metric].notna().any():
        values = df[metric].dropna()
        row["score"] = float(values.max() if spec.settings.mode == "max" else values.min())
    if reported and "miou" in df and df["miou"].notna().any():
        row["best_miou"] = float(df["miou"].max())
    if result.error is not None:
        row["status"] = "error"
        row["error"] = failure_message(result.error)
    elif statuses.get(tune_id, "TERMINATED") != "TERMINATED":
        row["status"] = "unfinished"  # the sweep was interrupted; a rerun continues it
    elif row["score"] is None:
        row["status"] = "not run"
    elif row["epochs"] < spec.base.trainer.epochs:
        row["status"] = "stopped early"
    else:
        row["status"] = "done"
    return row


def _attempts(path: str) -> int:
    """How many times this sweep was started (its `tune-NNN/` experiment folders)."""
    import pyarrow.fs as pafs

    fs, p = resolve_fs(path)
    found = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    return sum(1 for i in found if i.type == pafs.FileType.Directory and i.base_name[:5] == "tune-")


def _write(path: str, text: str | bytes) -> None:
    """Write a file of the sweep's folder (local or a URI), atomically."""
    fs, p = resolve_fs(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    write_atomic(fs, p, text.encode() if isinstance(text, str) else text)


def best_config_yaml(spec: SweepSpec, row: dict) -> str:
    """The winning trial's complete distill config (the teacher it used included)."""
    cfg = spec.trial_config({k: row[k] for k in spec.search})
    miou = "n/a" if row.get("best_miou") is None else f"{100 * row['best_miou']:.2f}"
    header = (
        f"# Best trial {row['trial_id']} of sweep '{spec.settings.name}' ({spec.source}): "
        f"best {spec.settings.metric} {row['score']:.6g}, val mIoU {miou}, after "
        f"{row['epochs']} epoch(s).\n"
        f"# Run it: python pipelines/distill.py --config best.yaml\n"
    )
    return header + to_yaml(cfg)


def run_sweep(
    spec: SweepSpec, info: DatasetInfo, teacher: Teacher | None, log=print
) -> SweepOutcome:
    """Run (or continue) the sweep to the end and write its outputs."""
    start = time.perf_counter()
    storage, name = sweep_paths(spec)
    path = f"{storage}/{name}"
    s = spec.settings
    trainable = tune.with_resources(
        tune.with_parameters(_trial, spec=spec, info=info, teacher=teacher, runs=f"{path}/runs"),
        driver_resources(s.driver_cpus),
    )
    limit = check_sweep(spec)
    trials = s.num_samples * math.prod(
        len(d.args[0]) for d in spec.search.values() if d.name == "grid"
    )
    bars = wants_bars(spec.base.trainer.progress)
    progress = TrialProgress(trials, spec.base.trainer.epochs, s.metric, bars, f"{path}/runs", log)
    started = _attempts(path)
    if started:
        log(f"sweep: continuing {path} (finished and stopped trials replay their records)")
    else:
        log(f"sweep: {path}, {s.num_samples} sample(s), at most {limit} trial(s) at once")
        _write(f"{path}/{IDENTITY_FILE}", json.dumps(identity(spec), indent=1))
    params = {k: to_tune(d) for k, d in spec.search.items()}
    tuner = tune.Tuner(
        trainable,
        # The sample index as a grid dimension (not num_samples): each trial knows it, so its
        # Train run has the same name on every start (`trial_run_name`).
        param_space={"params": params, SAMPLE_KEY: tune.grid_search(list(range(s.num_samples)))},
        tune_config=tune.TuneConfig(
            metric=s.metric,
            mode=s.mode,
            scheduler=_scheduler(spec),
            num_samples=1,
            # The limit goes to the generator: TuneConfig.max_concurrent_trials is ignored
            # (with a warning) when a search_alg that is not a Searcher is given.
            search_alg=tune.search.BasicVariantGenerator(random_state=s.seed, max_concurrent=limit),
            trial_dirname_creator=lambda trial: f"trial-{trial.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=f"tune-{started:03d}",  # a new Tune experiment per start; nothing restored
            storage_path=path,
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            verbose=1 if spec.base.trainer.verbose else 0,
            callbacks=[progress],
        ),
    )
    grid = tuner.fit()
    try:  # trial states (private API; without it every trial counts as finished)
        statuses = {t.trial_id: t.status for t in grid._experiment_analysis.trials}
    except AttributeError:
        statuses = {}
    rows = rank_rows([_row(r, spec, statuses) for r in grid], s.mode)
    keys = list(spec.search)
    m = s.metric
    _write(f"{path}/trials.csv", to_csv(rows, keys, m))
    _write(f"{path}/trials.md", to_markdown(rows, keys, f"Sweep {name} ({spec.source})", m))
    _write(f"{path}/params.png", plot_png(rows, spec.search, m))
    best_yaml = None
    if rows and rows[0].get("score") is not None and math.isfinite(rows[0]["score"]):
        best_yaml = f"{path}/best.yaml"
        _write(best_yaml, best_config_yaml(spec, rows[0]))
    return SweepOutcome(path, rows, best_yaml, time.perf_counter() - start)


__all__ = [
    "SweepOutcome",
    "check_sweep",
    "concurrency",
    "run_sweep",
    "sweep_paths",
    "to_tune",
    "trial_run_name",
]
