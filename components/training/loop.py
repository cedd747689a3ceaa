"""The Ray Train worker: the training core (`core.py`) run on dataset shards, with what is Ray's.

Each epoch: `train_one_epoch` on this worker's even split of the regime's streams (one batch of
each per step, keys of the second prefixed `u_`) for exactly `steps_per_epoch` steps, evaluation
on its part of `val` (confusion matrices summed across workers), then every worker calls
`ray.train.report` once; rank 0 attaches a checkpoint with the full training state. A restarted
worker group, or the same command run again, resumes from `ray.train.get_checkpoint()` (or a
newer complete checkpoint the driver found in the run folder).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from components.config import Config, from_dict
from components.data.device import model_batch
from components.data.local_val import LocalVal
from components.data.shards import DatasetInfo
from components.distillation.protocol import MethodBase, unwrap
from components.inference import EvalMode
from components.metrics import boundary_iou, miou, pixel_accuracy
from components.models.build import architecture, build_model
from components.regimes import LABELED, Regime, regime_of
from components.training.checkpoint import (
    META_FILE,
    CheckpointError,
    latest_resumable,
    load_full_state,
    read_meta,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from components.training.core import BadDataError, EpochStats, train_one_epoch
from components.training.distributed import (
    all_reduce_sum,
    distributed,
    mean_terms,
    set_cpu_threads,
)
from components.training.evaluation import EvalCounts, evaluate_counts
from components.training.local_mode import keep_checkpoints
from components.training.progress import Bar, iterate
from components.training.runlog import RunLog, quiet_train_console, val_panels
from components.training.schedule import Schedule, build_optimizer


def _dtypes(columns: dict[str, str]) -> dict[str, torch.dtype]:
    return {k: getattr(torch, v) for k, v in columns.items()}


@dataclass
class Worker:
    """Everything one worker holds for a run."""

    config: dict  # the driver's train_loop_config
    cfg: Config
    regime: Regime
    rank: int
    world: int
    device: torch.device
    amp_dtype: torch.dtype | None
    method: MethodBase
    teacher: nn.Module | None
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    progress: dict
    log: RunLog | None = None  # rank 0's record in the run folder
    local_val: LocalVal | None = None  # this worker's val rows, decoded once (val_in_workers)

    @property
    def bars(self) -> bool:
        """Progress bars from rank 0 when the driver asked for them (progress.wants_bars)."""
        return self.rank == 0 and bool(self.config.get("progress_bars"))

    def print0(self, msg: str) -> None:
        if self.log is not None:
            self.log.line(msg)  # console.log, and stdout
        elif self.rank == 0:
            print(msg, flush=True)


def _build_teacher(config: dict, num_classes: int, device: torch.device) -> nn.Module | None:
    if config.get("teacher_state") is None:
        return None
    model_cfg = from_dict({"model": config["teacher_model"]}).model
    teacher = build_model(architecture(model_cfg), num_classes)
    state = config["teacher_state"]
    if isinstance(state, ray.ObjectRef):
        state = ray.get(state)
    teacher.load_state_dict(state)
    return teacher.to(device).eval()


def _setup(config: dict) -> Worker:
    """Models, method, optimizer and schedule of this worker, from the driver's config."""
    cfg: Config = from_dict(config["cfg"])
    if not cfg.trainer.verbose:
        quiet_train_console()
    t, k = cfg.trainer, config["num_classes"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    torch.manual_seed(t.seed * 1000 + rank)
    if not on_gpu:
        set_cpu_threads(t.torch_threads)
    student = build_model(cfg.model, k).to(device)
    teacher = _build_teacher(config, k, device)
    if on_gpu and t.channels_last:
        student = student.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher = teacher.to(memory_format=torch.channels_last)
    amp_dtype = torch.bfloat16 if (on_gpu and t.amp) else None
    regime = regime_of(cfg.method.name)
    method = regime.build_method(
        cfg,
        student,
        teacher,
        num_classes=k,
        autocast_dtype=amp_dtype,
        ignore_index=config["ignore_index"],
    ).to(device)
    optimizer = build_optimizer(method.trainable, cfg.optim)
    schedule = Schedule.of(optimizer, config["steps_per_epoch"] * t.epochs, cfg.optim)
    progress = {"epoch": 0, "iteration": 0, "best_miou": -1.0, "best_epoch": -1}
    return Worker(
        config, cfg, regime, rank, world, device, amp_dtype, method, teacher, optimizer,
        schedule, progress,
    )  # fmt: skip


def _resume(w: Worker) -> str | None:
    """The newest full state: Ray's checkpoint, or a newer complete checkpoint folder of the run
    that Ray had not registered (the driver or a worker group lost between a checkpoint's upload
    and Ray's bookkeeping), looked up at every start of the worker group
    (`_newest_in_run_folder`). The schedule needs nothing: the iteration sets the learning
    rate."""
    state, source, unusable = None, "", None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            try:
                state, _ = load_full_state(folder)
            except CheckpointError as e:  # corrupted or cut short: the newest verified instead
                unusable = e
                w.print0(f"warning: skipping Ray's newest checkpoint: {e}")
    found = _newest_in_run_folder(w)
    if found is not None and (
        state is None or read_meta(found)["progress"]["iteration"] > state["progress"]["iteration"]
    ):
        state, _ = load_full_state(found)
        why = "Ray's newest was unusable" if unusable else "which Ray had not registered"
        # In the driver (local mode) the run folder is the only record: nothing to explain.
        source = f" ({found})" if w.config.get("in_driver") else f" ({found}, {why})"
    if state is None and unusable is not None:
        # Starting over would write new checkpoints over the run's older ones.
        raise CheckpointError(
            f"{unusable}; no other verified checkpoint of this run to resume from (storage on a "
            "URI is not searched); refusing to start the run over"
        )
    if state is None:
        return None
    w.method.trainable.load_state_dict(state["trainable"])
    w.optimizer.load_state_dict(state["optimizer"])
    w.method.load_extra_state(state.get("method", {}))
    w.progress.update(state["progress"])
    rngs = state.get("rng", [])
    if w.rank < len(rngs):
        set_rng_state(rngs[w.rank])
    p = w.progress
    return f"resumed from checkpoint: epoch {p['epoch']}, iteration {p['iteration']}{source}"


def _newest_in_run_folder(w: Worker) -> str | None:
    """The run folder's newest complete checkpoint, looked up now, at this start of the worker
    group (a restart after a lost worker comes back here): the driver's lookup before the fit
    (`resume_folder`) misses checkpoints written since, and Ray may not have recorded the newest
    one (a group lost between its upload and Ray's bookkeeping). URIs and folders this node
    cannot see fall back to the driver's answer."""
    run_folder = w.config.get("run_folder")
    if run_folder and "://" not in run_folder and Path(run_folder).is_dir():
        newest = latest_resumable(run_folder, warn=w.print0)
        if newest is not None:
            return str(newest)
    return w.config.get("resume_folder")


class Streams:
    """Training streams zipped: one batch of each per step, keys prefixed by the stream's
    prefix; ends when any stream does."""

    def __init__(self, iterators: dict[str, object]):
        self.iterators = {prefix: iter(it) for prefix, it in iterators.items()}

    @classmethod
    def of(cls, w: Worker) -> Streams:
        """This worker's shards of the regime's streams."""
        d = w.cfg.data
        iterators = {}
        for stream in w.regime.streams:
            size = d.batch_size if stream.prefix == "" else d.unlabeled_batch_size or d.batch_size
            iterators[stream.prefix] = ray.train.get_dataset_shard(
                stream.dataset
            ).iter_torch_batches(
                batch_size=size,
                drop_last=True,
                prefetch_batches=d.prefetch_batches,
                device=w.device,
                dtypes=_dtypes(stream.dtypes),
            )
        return cls(iterators)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = {}
        for prefix, it in self.iterators.items():
            batch.update(model_batch({prefix + k: v for k, v in next(it).items()}, prefix))
        return batch

    def drain(self) -> None:
        """An even split has nothing left; drain rather than stall the streams."""
        for it in self.iterators.values():
            for _ in it:
                pass


def evaluate(w: Worker, model: nn.Module) -> EvalCounts:
    """The counts of `model` over the whole val split under `eval` (mode, scales, flip,
    boundary band), summed across workers."""
    d, e = w.cfg.data, w.cfg.eval
    total = w.config.get("val_rows") if w.world == 1 else None  # a share of an uneven split
    local = w.config.get("val_in_workers")
    if local is not None:  # decoded once, kept in this worker's memory
        if w.local_val is None:
            info = DatasetInfo.from_json(local["info"])
            w.local_val = LocalVal(local["root"], info, d.val_split, w.rank, w.world)
        batches = w.local_val.batches(d.val_batch_size, w.device)
        total = len(w.local_val)
    else:
        batches = ray.train.get_dataset_shard("val").iter_torch_batches(
            batch_size=d.val_batch_size,
            dtypes=_dtypes(LABELED),
            device=w.device,
            prefetch_batches=d.prefetch_batches,
        )
    batches = map(model_batch, batches)
    if w.bars:
        batches = iterate(batches, Bar("val", total, unit="img"), lambda b: len(b["mask"]))
    num_classes, ignore_index = w.config["num_classes"], w.config["ignore_index"]
    mode = EvalMode.from_config(e)
    counts = evaluate_counts(
        model, batches, num_classes, ignore_index, w.amp_dtype, mode, e.boundary_width
    )
    counts.confusion = all_reduce_sum(counts.confusion.to(w.device)).cpu()
    if counts.boundary is not None:
        counts.boundary = all_reduce_sum(counts.boundary.to(w.device)).cpu()
    return counts


def _max_bad_rows(w: Worker, steps: int) -> float:
    """The bad rows the whole epoch may hold (all workers, every stream's rows per step)."""
    d = w.cfg.data
    per_step = d.batch_size + (
        (d.unlabeled_batch_size or d.batch_size) if w.regime.streams[1:] else 0
    )
    return d.max_bad_fraction * per_step * steps * w.world


def _epoch_totals(w: Worker, stats: EpochStats) -> dict:
    """The epoch's counts summed over workers; fails on uneven steps or too many bad rows."""
    counts = all_reduce_sum(
        torch.tensor(
            [stats.steps, stats.bad_rows, stats.seen_rows, stats.wait_s, stats.train_s],
            dtype=torch.float64,
        )
    ).tolist()
    steps, bad, seen, wait_s, train_s = counts
    if steps != stats.steps * w.world:
        raise RuntimeError(
            f"workers ran different step counts this epoch (this one {stats.steps}); "
            "the train split was not divided evenly"
        )
    limit = w.cfg.data.max_bad_fraction
    if seen and bad / seen > limit:
        raise BadDataError(
            f"{int(bad)} of {int(seen)} training rows were bad (undecodable, wrong mask size or "
            f"label ids >= {w.config['num_classes']}); more than data.max_bad_fraction={limit}. "
            "The skipped ids are in the worker logs."
        )
    return {"steps": steps, "bad_rows": int(bad), "wait_s": wait_s, "train_s": train_s}


def sync_batch_norm(module: nn.Module, setting: bool | None, on_gpu: bool) -> nn.Module:
    """`module` with its BatchNorms synchronised across the workers when `trainer.sync_bn` asks
    (None: on GPUs). The state_dict keys do not change, so checkpoints load into plain models."""
    if on_gpu and setting is not False:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module


NOT_EVALUATED = -1.0  # miou / pixel_acc of an epoch without evaluation: never the best checkpoint


def evaluates(cfg: Config, epoch: int) -> bool:
    """Whether the 0-based `epoch` ends with an evaluation: every `trainer.eval_every` epochs
    and always the last."""
    t = cfg.trainer
    return (epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs


def _epoch_metrics(w: Worker, stats: EpochStats, totals: dict, epoch: int) -> tuple[dict, dict]:
    """Evaluate, update the best mIoU; (what the epoch reports, the terms' means). Rank 0 logs
    the evaluation (per-class IoU, image panels) in the run folder."""
    t_eval = time.perf_counter()
    evaluated = evaluates(w.cfg, epoch)
    counts = evaluate(w, w.method.eval_model()) if evaluated else None
    eval_s = time.perf_counter() - t_eval
    mean_iou, per_class = miou(counts.confusion) if counts else (NOT_EVALUATED, None)
    terms = mean_terms(stats.sums, stats.reported, w.world)
    p = w.progress
    p["epoch"] = epoch + 1
    if mean_iou > p["best_miou"]:
        p["best_miou"], p["best_epoch"] = mean_iou, epoch + 1
    keys = ("epoch", "iteration", "best_miou", "best_epoch", "teacher_miou")
    train_s = totals["train_s"] / w.world
    metrics = {
        **{k: p[k] for k in keys if k in p},
        "miou": mean_iou,
        "pixel_acc": pixel_accuracy(counts.confusion) if counts else NOT_EVALUATED,
        "lr": w.optimizer.param_groups[0]["lr"],
        **terms,
        "images_per_s": totals["steps"] * w.cfg.data.batch_size / max(1e-9, train_s),
        "data_wait_share": totals["wait_s"] / max(1e-9, totals["train_s"]),
        **_step_times(stats.step_s),
        "train_s": train_s,
        "eval_s": eval_s,
        "bad_rows": totals["bad_rows"],
        "world_size": w.world,
    }
    if counts is not None and counts.boundary is not None:
        metrics["boundary_iou"] = boundary_iou(counts.boundary)[0]
    if w.log is not None and counts is not None:
        names = w.config.get("class_names") or [str(k) for k in range(len(per_class))]
        every, epochs = w.cfg.trainer.image_every, w.cfg.trainer.epochs
        show = every > 0 and ((epoch + 1) % every == 0 or epoch + 1 == epochs)
        w.log.evaluation(
            p["iteration"],
            metrics,
            dict(zip(names, per_class.tolist())),
            _panels(w) if show else None,
        )
    return metrics, terms


def _step_times(step_s: list[float]) -> dict[str, float]:
    """This worker's step times (waits excluded), ms: median, mean, 99th percentile."""
    if not step_s:
        return {}
    ms = np.asarray(step_s) * 1000
    return {
        "step_ms_median": float(np.median(ms)),
        "step_ms_mean": float(ms.mean()),
        "step_ms_p99": float(np.percentile(ms, 99)),
    }


def _panels(w: Worker) -> dict[str, np.ndarray]:
    """Image | ground truth | student | teacher | the method's own maps (pseudo labels) of the
    fixed val images (rank 0 only)."""
    rows = w.config.get("panel_rows")
    if rows is None:
        return {}
    if isinstance(rows, ray.ObjectRef):
        rows = w.config["panel_rows"] = ray.get(rows)
    models = [w.method.eval_model(), *([w.teacher] if w.teacher is not None else [])]
    palette, ignore = w.config["palette"], w.config["ignore_index"]
    return val_panels(models, rows, palette, ignore, w.device, w.method)


def _report(w: Worker, metrics: dict, epoch: int) -> None:
    """Every worker reports; rank 0 attaches the checkpoint with the full state (and writes the
    row to metrics.jsonl first)."""
    if w.log is not None:
        w.log.row(metrics)
        w.log.sync()
    rngs: list = [None] * w.world
    if distributed():
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if w.rank == 0:
            full_state = {
                "trainable": unwrap(w.method.trainable).state_dict(),
                "optimizer": w.optimizer.state_dict(),
                "method": w.method.extra_state(),
                "progress": dict(w.progress),
                "rng": rngs,
            }
            c = w.config
            meta = {
                "config": c["cfg"],
                "model": c["cfg"]["model"],
                "num_classes": c["num_classes"],
                "class_names": c.get("class_names"),
                "ignore_index": c["ignore_index"],
                "progress": dict(w.progress),
                "metrics": metrics,
            }
            folder = tmp
            if c.get("in_driver"):  # local mode keeps a checkpoint in memory: written here
                folder = Path(c["run_folder"]) / f"epoch_{epoch + 1:04d}"
                (folder / META_FILE).unlink(missing_ok=True)  # a rewrite is not "complete"
            save_checkpoint(folder, w.method.eval_model().state_dict(), full_state, meta)
            if c.get("in_driver"):
                keep_checkpoints(c["run_folder"], c["num_to_keep"], warn=w.print0)
            ckpt = ray.train.Checkpoint.from_directory(str(folder))
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch_{epoch + 1:04d}")


def _step_logger(w: Worker, epoch: int, bar: Bar):
    """Every step to TensorBoard; the epoch's bar (on a terminal) or a line every `log_every`
    steps (in a log file); console.log gets the lines either way."""
    t = w.cfg.trainer
    total = w.schedule.total_iters
    batch = w.cfg.data.batch_size * w.world
    started = time.perf_counter()
    done = [0]

    def log(iteration: int, values: dict[str, float], wait_s: float) -> None:
        done[0] += 1
        if w.bars:
            speed = done[0] * batch / max(time.perf_counter() - started, 1e-9)
            loss = values.get("loss", float("nan"))
            bar.update(1, desc=f"epoch {epoch + 1}/{t.epochs} loss {loss:.4f} {speed:.1f} img/s")
        if w.log is None:
            return
        lr = w.schedule.base_lrs[0] * w.schedule.factor(iteration - 1)  # this step's rate
        w.log.step(iteration, values, lr, wait_s)
        if iteration % t.log_every == 0:
            shown = " ".join(f"{k} {v:.4f}" for k, v in values.items())
            line = f"epoch {epoch + 1}/{t.epochs} it {iteration}/{total} {shown} lr {lr:.2e}"
            w.log.line(line, echo=not w.bars)
            w.log.step_row(iteration, values, lr)

    return log


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. `config` is built by `components.training.trainer`:
    cfg (dict), num_classes, ignore_index, class_names, steps_per_epoch, and optionally
    teacher_state (an ObjectRef to a state_dict) with teacher_model (a ModelConfig dict)."""
    w = _setup(config)
    resumed = _resume(w)
    if w.rank == 0 and config.get("run_folder"):
        w.log = RunLog(config["run_folder"], resume_iteration=w.progress["iteration"])
    if resumed:
        w.print0(resumed)
    try:
        _train(w)
    finally:
        if w.log is not None:
            w.log.close()


def _train(w: Worker) -> None:
    """The epochs of a set-up (and resumed) worker."""
    config = w.config
    if w.world > 1:
        on_gpu = w.device.type == "cuda"
        w.method.trainable = sync_batch_norm(w.method.trainable, w.cfg.trainer.sync_bn, on_gpu)
        w.method.trainable = nn.parallel.DistributedDataParallel(
            w.method.trainable, device_ids=[w.device.index] if on_gpu else None
        )
    if w.teacher is not None and "teacher_miou" not in w.progress:
        known = config.get("teacher_miou")  # a teacher this job trained: its last evaluation
        if known is not None:
            w.progress["teacher_miou"] = known
            w.print0(f"teacher val mIoU {100 * known:.2f} (its own run's last evaluation)")
        else:  # once per run, on the workers (the driver may be a CPU-only head node)
            w.progress["teacher_miou"] = miou(evaluate(w, w.teacher).confusion)[0]
            w.print0(f"teacher val mIoU {100 * w.progress['teacher_miou']:.2f}")
    t = w.cfg.trainer
    for epoch in range(w.progress["epoch"], t.epochs):
        streams = Streams.of(w)
        steps = config["steps_per_epoch"]
        with Bar(f"epoch {epoch + 1}/{t.epochs}", steps, "step", enabled=w.bars) as bar:
            stats = train_one_epoch(
                w.method,
                streams,
                w.optimizer,
                w.schedule,
                w.progress,
                steps,
                autocast_dtype=w.amp_dtype,
                channels_last=w.device.type == "cuda" and t.channels_last,
                on_step=_step_logger(w, epoch, bar),
                max_bad_rows=_max_bad_rows(w, steps),
            )
        t_drain = time.perf_counter()
        streams.drain()
        stats.train_s += time.perf_counter() - t_drain
        totals = _epoch_totals(w, stats)
        metrics, terms = _epoch_metrics(w, stats, totals, epoch)
        shown = " ".join(f"{k} {v:.4f}" for k, v in terms.items())
        if "boundary_iou" in metrics:
            band = w.cfg.eval.boundary_width
            shown = f"bIoU@{band}px {100 * metrics['boundary_iou']:.2f}  {shown}"
        val = (
            f"val mIoU {100 * metrics['miou']:.2f}"
            if metrics["miou"] != NOT_EVALUATED
            else f"(val every {t.eval_every} epochs)"
        )
        w.print0(
            f"epoch {epoch + 1}/{t.epochs}: {val}  {shown}  "
            f"{metrics['images_per_s']:.1f} img/s, data wait "
            f"{100 * metrics['data_wait_share']:.0f}%"
        )
        _report(w, metrics, epoch)
