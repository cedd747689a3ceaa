"""Driver side of a training run: checks, resources, the TorchTrainer, the teacher cache.

    info = prepare_dataset(cfg)                 # makes the synthetic dataset when configured
    teacher = obtain_teacher(cfg, info)         # a configured checkpoint, or train/reuse one
    outcome = fit(cfg, info, run_name(cfg), teacher=teacher)

Everything that can be checked before training (the dataset, the teacher's class count, the
resources a run asks for) is checked here, on the driver, so a bad input fails in seconds with
the file or key named instead of deep inside a worker.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchTrainer

from components.config import (
    SYNTHETIC_PRETRAINED,
    SYNTHETIC_ROOTS,
    Config,
    ConfigError,
    MethodConfig,
    ModelConfig,
    fingerprint,
    from_dict,
    to_dict,
    to_yaml,
    validate_against_dataset,
)
from components.data.ingest import SegDataConfig
from components.data.local_val import local_root, val_in_workers
from components.data.shards import DatasetInfo, list_shards, resolve_fs, write_atomic
from components.data.synthetic import ensure_synthetic
from components.models.build import architecture, build_model
from components.models.checkpointed import is_bare_file, load_bare_state
from components.regimes import regime_of
from components.training import local_mode
from components.training.checkpoint import (
    CheckpointError,
    latest_resumable,
    load_model_state,
    newest_verified,
    read_meta,
    resolve_checkpoint,
)
from components.training.loop import train_loop_per_worker
from components.training.pretrain import resolve_pretrained
from components.training.progress import wants_bars
from components.training.resources import (
    Request,
    cluster_capacity,
    run_request,
    started_here,
    wait_for_resources,
)
from components.training.runlock import run_lock
from components.training.storage import absolute_storage, finished_uri_checkpoint, is_uri, join


@dataclass
class Teacher:
    model: ModelConfig
    state: dict
    source: str
    # Its val mIoU when known to be on the student's val split under the same `eval` (a teacher
    # this job trained: its run's last evaluation); None: the student run evaluates it once.
    val_miou: float | None = None


@dataclass
class Outcome:
    name: str
    metrics: dict
    checkpoint_dir: str | None
    wall_s: float
    reused: bool = False  # the run had already finished; nothing was trained


def may_generate(d) -> bool:
    """`data.generate_synthetic`, where None means: only at an embedded default's own root."""
    if d.generate_synthetic is not None:
        return d.generate_synthetic
    return Path(d.root).as_posix().removeprefix("./").rstrip("/") in SYNTHETIC_ROOTS


def prepare_dataset(cfg: Config) -> DatasetInfo:
    d = cfg.data
    if not _exists(d.root):
        if may_generate(d):
            return _checked(cfg, ensure_synthetic(d.root, d.synthetic))
        if d.generate_synthetic is None:  # not asked to generate: the root was meant to exist
            raise ConfigError(
                f"'data.root': {d.root} holds no dataset (no dataset.json). Convert one there "
                "with pipelines/prepare_data.py (docs/datasets.md), or set "
                "data.generate_synthetic=true to make the synthetic dataset there"
            )
    return _checked(cfg, DatasetInfo.load(d.root))


def _checked(cfg: Config, info: DatasetInfo) -> DatasetInfo:
    """The dataset fits the config: class count, splits with shards, a batch per worker."""
    d = cfg.data
    validate_against_dataset(cfg, info.num_classes, f"{d.root}/dataset.json")
    for split in (d.train_split, d.val_split):
        if split not in info.splits:
            raise ConfigError(
                f"'data.{'train' if split == d.train_split else 'val'}_split': "
                f"{d.root}/dataset.json has no split '{split}' (has {sorted(info.splits)})"
            )
        list_shards(d.root, split)  # raises naming the folder when missing or empty
    rows = info.splits[d.train_split].rows
    if d.labeled_count is not None:
        rows = min(rows, d.labeled_count)
    workers = cfg.trainer.num_workers
    if rows * d.train_repeat < workers * d.batch_size:
        raise ConfigError(
            f"'data.batch_size': split '{d.train_split}' of {d.root} has {rows} rows"
            f"{' used' if d.labeled_count is not None else ''}: too few for "
            f"trainer.num_workers={workers} x data.batch_size={d.batch_size} (need at least "
            f"{workers * d.batch_size}); lower data.batch_size or trainer.num_workers"
        )
    return info


def _exists(root: str) -> bool:
    if "://" in root:
        return True  # remote datasets are never generated here
    return (Path(root) / "dataset.json").exists()


def storage_of(cfg: Config) -> str:
    return absolute_storage(cfg.trainer.storage_path)


# Keys that change how a run is measured, shown or checked, not what it trains: not in its name
# (names stay what they were before these keys existed, so older runs still resume).
NOT_IN_NAME = (
    "eval",
    "trainer.progress",
    "trainer.eval_every",
    "trainer.sync_bn",
    "trainer.autoscale_wait_s",
    "trainer.local_mode",
    "data.val_in_workers",
    "model.pretrained_partial",
    "teacher.model.pretrained_partial",
)

# Keys added after runs were named that do change what is trained: in the name only when set to
# something other than their default, which is the behaviour from before they existed.
NAMED_WHEN_SET: dict[str, object] = {
    "method.adversarial.form": "wgan_gp",
    "model.variant": "torchvision",
    "model.head_channels": None,
    "model.aux_channels": None,
    "teacher.model.variant": "torchvision",
    "teacher.model.head_channels": None,
    "teacher.model.aux_channels": None,
}


# Keys added after runs were named that change what only one regime trains: (the regime's run
# prefix, the value that reproduces the behaviour from before the key existed). In that
# regime's names when set to anything else (the new defaults do: those runs train differently
# now, so they get new names); left out of every other regime's names.
REGIME_ONLY: dict[str, tuple[str, object]] = {
    "method.weakly.freeze_backbone_norms": ("wsss", False),
    "method.weakly.propagate_after": ("wsss", None),
    "method.semisup.labeled_loss": ("semisup", "ce"),
    "method.semisup.ohem_threshold": ("semisup", 0.7),
    "method.semisup.ohem_min_kept": ("semisup", 200000),
    "method.semisup.loss_scale": ("semisup", 1.0),
}


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _drop(tree: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node = _get(tree, ".".join(parents)) if parents else tree
    del node[leaf]


def run_name(cfg: Config, prefix: str | None = None) -> str:
    """Deterministic: the same experiment gets the same name, so re-running resumes it.

    The prefix is the regime's (`distill`, `semisup`, `wsss`) unless given. The trainer section
    is left out (except the seed): more epochs or more workers continue the same run rather than
    starting a new one. So is the `eval` section: it changes how val is measured, not what is
    trained (evaluate.py re-measures a finished run under another mode).
    """
    if cfg.trainer.name:
        return cfg.trainer.name
    prefix = prefix or regime_of(cfg.method.name).run_prefix
    key = dataclasses.replace(
        cfg,
        trainer=dataclasses.replace(Config().trainer, seed=cfg.trainer.seed),
        # Speed knobs do not change what is trained (nor whether the data was generated).
        data=dataclasses.replace(
            cfg.data,
            prefetch_batches=0,
            val_batch_size=8,
            cache_encoded=None,
            # None (the default since the key could be None) hashes as True, the default before
            generate_synthetic=cfg.data.generate_synthetic is not False,
        ),
    )
    tree = to_dict(key)
    for dotted in NOT_IN_NAME:
        _drop(tree, dotted)
    if SYNTHETIC_PRETRAINED not in (cfg.model.pretrained, cfg.teacher.model.pretrained):
        del tree["pretrain"]  # only the synthetic pretraining stage reads it
    for dotted, (regime_prefix, before) in REGIME_ONLY.items():
        if regime_of(cfg.method.name).run_prefix != regime_prefix or _get(tree, dotted) == before:
            _drop(tree, dotted)
    for dotted, default in NAMED_WHEN_SET.items():
        if _get(tree, dotted) == default:
            _drop(tree, dotted)
    return f"{prefix}-{cfg.method.name}-{cfg.model.backbone}-{fingerprint(tree)}"


def teacher_training_config(cfg: Config) -> Config:
    """The config that trains the teacher when none is given: `method: none` on the same data.

    Only what determines the teacher is kept: its model, the data, the optimisation (at
    `teacher.lr`, for `teacher.epochs`) and the seed. The student's model and method settings
    are reset to the schema's defaults, so the teacher's run name (a hash of this config) and
    with it the cached teacher are the same for every student setting."""
    return dataclasses.replace(
        cfg,
        model=cfg.teacher.model,
        method=MethodConfig(name="none"),
        optim=dataclasses.replace(cfg.optim, lr=cfg.teacher.lr),
        trainer=dataclasses.replace(cfg.trainer, epochs=cfg.teacher.epochs, name=None),
    )


def _check_teacher_classes(state: dict, num_classes: int, source: str) -> None:
    # SegFormer's head names its classifier linear_pred (NVlabs' segformer_head.py)
    weight = state.get("head.classifier.weight", state.get("head.linear_pred.weight"))
    if weight is None:
        weight = next((v for k, v in state.items() if k.endswith("classifier.weight")), None)
    if weight is None:
        raise CheckpointError(
            f"{source}: no classifier weight found; is this a segmentation model?"
        )
    if weight.shape[0] != num_classes:
        raise CheckpointError(
            f"{source}: teacher predicts {weight.shape[0]} classes but the dataset has "
            f"{num_classes}"
        )


def load_teacher(path: str, fallback_model: ModelConfig, num_classes: int) -> Teacher:
    """A teacher from a checkpoint folder / run folder / model.pt of ours, or a bare state_dict
    file (then `teacher.model` describes the architecture)."""
    if is_bare_file(path):  # ours or a released model's layout, converted whole or refused
        model = fallback_model
        state = load_bare_state(path, model, num_classes)
    else:
        folder = resolve_checkpoint(path)  # a URI is fetched into a local cache
        state, meta = load_model_state(folder)
        model = from_dict({"model": meta["model"]}).model
        path = path if is_uri(path) else str(folder)
    _check_teacher_classes(state, num_classes, path)
    try:
        build_model(architecture(model), num_classes).load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[:3]
        raise CheckpointError(
            f"{path}: does not fit teacher.model ({model.backbone}, {model.head}, width "
            f"{model.width}): {' '.join(first)}"
        ) from e
    return Teacher(model=model, state=state, source=path)


def finished_checkpoint(storage: str, name: str, epochs: int) -> Path | None:
    """The checkpoint of run `name` that reached `epochs`, if there is one (a local copy when
    the storage is a URI)."""
    if is_uri(storage):
        return finished_uri_checkpoint(storage, name, epochs)
    if not (Path(storage) / name).is_dir():
        return None
    folder = newest_verified(Path(storage) / name)  # a corrupted newest one: the one before
    if folder is not None and read_meta(folder).get("progress", {}).get("epoch", 0) >= epochs:
        return folder
    return None


def obtain_teacher(cfg: Config, info: DatasetInfo, log=print) -> Teacher | None:
    if not regime_of(cfg.method.name).needs_teacher(cfg.method.name):
        return None
    if cfg.teacher.checkpoint:
        teacher = load_teacher(cfg.teacher.checkpoint, cfg.teacher.model, info.num_classes)
        log(f"teacher: {teacher.source}")
        return teacher
    tcfg = teacher_training_config(cfg)
    name = run_name(tcfg, prefix="teacher")
    log(f"teacher: no checkpoint configured; training or reusing {name}")
    outcome = fit(tcfg, info, name)
    if outcome.checkpoint_dir is None:
        raise CheckpointError(f"teacher run {name} finished without a checkpoint")
    # On URI storage the run folder's URI (its latest checkpoint, fetched into the local cache)
    # is what the teacher's source reads, so a sweep's best.yaml names it rather than the cache.
    storage = storage_of(tcfg)
    source = join(storage, name) if is_uri(storage) else outcome.checkpoint_dir
    if outcome.reused:
        log(f"teacher: reusing {source}")
    teacher = load_teacher(source, cfg.teacher.model, info.num_classes)
    teacher.val_miou = _same_evaluation_miou(cfg, outcome)
    return teacher


def _same_evaluation_miou(cfg: Config, outcome: Outcome) -> float | None:
    """The teacher run's last val mIoU when it was measured as the student run will measure
    it (the same val split and root, the same `eval`: `eval` is not in run names, so a cached
    teacher may have been evaluated under another mode), else None."""
    val = outcome.metrics.get("miou")
    if not isinstance(val, (int, float)) or val < 0 or outcome.checkpoint_dir is None:
        return None
    saved = read_meta(outcome.checkpoint_dir).get("config", {})
    here = to_dict(cfg)
    same = saved.get("eval") == here["eval"] and all(
        saved.get("data", {}).get(k) == here["data"][k] for k in ("root", "val_split")
    )
    return float(val) if same else None


def _request(cfg: Config) -> Request:
    """GPU use and per-worker resources from the config and what the cluster has (or, when it
    autoscales, can have: a GPU cluster may start with no GPU node)."""
    capacity = cluster_capacity()
    local = capacity.get("CPU", 0.0) if started_here() else None
    return run_request(cfg.trainer, capacity.get("GPU", 0) > 0, local)


def _resumable(cfg: Config, name: str) -> str | None:
    """The run's newest complete checkpoint on local (or mounted shared) storage, for the loop
    to compare with Ray's own: a kill between a checkpoint's upload and Ray's record of it
    would otherwise restart the run from the checkpoint before (or from scratch). On URI
    storage Ray's record is the only source."""
    storage = storage_of(cfg)
    if is_uri(storage):
        return None
    folder = latest_resumable(Path(storage) / name)
    return None if folder is None else str(folder)


def _write_config(cfg: Config, name: str) -> None:
    """The resolved config as `config.yaml` in the run folder (`--config` reruns it)."""
    fs, root = resolve_fs(join(storage_of(cfg), name))
    fs.create_dir(root, recursive=True)
    write_atomic(fs, f"{root}/config.yaml", to_yaml(cfg).encode())


def _check_same_run(cfg: Config, name: str) -> None:
    """A run folder that holds checkpoints of another model or method (a reused
    `trainer.name`) is refused before Ray starts its workers, naming what differs."""
    found = _resumable(cfg, name)
    if found is None:
        return
    saved = from_dict(read_meta(found).get("config", {}))
    for key in ("model", "method.name"):
        section, _, leaf = key.partition(".")
        old, new = getattr(saved, section), getattr(cfg, section)
        if leaf:
            old, new = getattr(old, leaf), getattr(new, leaf)
        if old != new:
            raise ConfigError(
                f"'trainer.name': the run folder {join(storage_of(cfg), name)} holds "
                f"checkpoints of another config ({key}: {old} there, {new} here); choose another "
                "trainer.name, or delete that folder to start this run fresh"
            )


def _continue_epochs(datasets: dict, resume: str | None) -> None:
    """A resumed run's datasets count their executions (epochs) on from the checkpoint's, so
    the block order and the augmentation (both seeded by that count: data/ingest.py) continue
    as in an uninterrupted run instead of repeating the first epochs'. Ray Data raises the
    count after each finished execution (execution_idx_update_callback.py); on URI storage the
    driver does not see the checkpoint and the count starts at 0."""
    if resume is None:
        return
    done = int(read_meta(resume).get("progress", {}).get("epoch", 0))
    for ds in datasets.values():
        ds.context._execution_idx = done


def build_trainer(
    cfg: Config,
    info: DatasetInfo,
    name: str,
    teacher: Teacher | None = None,
    callbacks: list | None = None,
):
    request = _request(cfg)
    in_driver = local_mode.runs_in_driver(cfg.trainer, request)
    quiet_ray_data(not cfg.trainer.verbose)  # before the datasets copy the context
    datasets, steps = regime_of(cfg.method.name).build_datasets(cfg, info, request.num_workers)
    val_local = None
    if val_in_workers(cfg.data, info, request.num_workers):  # no Ray Data pipeline for val
        datasets.pop("val", None)
        val_local = {"root": local_root(cfg.data.root), "info": info.to_json()}
    resume = _resumable(cfg, name)
    _continue_epochs(datasets, resume)
    if in_driver:  # no worker, so no DataConfig: the splits' options set here
        datasets = local_mode.driver_inputs(datasets, request, cfg.trainer.verbose)
    loop_config = {
        "cfg": to_dict(cfg),
        "num_classes": info.num_classes,
        "ignore_index": info.ignore_index,
        "class_names": info.class_names,
        "steps_per_epoch": steps,
        "resume_folder": resume,
        "run_folder": join(storage_of(cfg), name),
        "palette": info.palette,
        "progress_bars": wants_bars(cfg.trainer.progress),
        "val_rows": info.splits[cfg.data.val_split].rows,
        "val_in_workers": val_local,
        "panel_rows": ray.put(panel_rows(cfg, info)) if cfg.trainer.image_every else None,
        "in_driver": in_driver,
        "num_to_keep": cfg.trainer.num_to_keep,
    }
    if teacher is not None:
        loop_config["teacher_state"] = ray.put(teacher.state)
        loop_config["teacher_model"] = dataclasses.asdict(teacher.model)
        loop_config["teacher_miou"] = teacher.val_miou
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=0 if in_driver else request.num_workers,  # 0: Ray Train's local mode
            use_gpu=request.use_gpu,
            resources_per_worker=request.per_worker,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_of(cfg),
            # The best by val mIoU; Ray keeps the newest as well (for resume).
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.trainer.num_to_keep,
                checkpoint_score_attribute="miou",
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.trainer.max_failures),
            callbacks=callbacks,
            # Train's own INFO lines (resources, worker group, every report) with --verbose.
            logging_config=ray.train.LoggingConfig(
                log_level="INFO" if cfg.trainer.verbose else "WARNING"
            ),
        ),
        datasets=datasets,
        dataset_config=SegDataConfig(),
    )


def quiet_ray_data(quiet: bool) -> None:
    """Ray Data's execution plans and progress bars off (on with --verbose). Each dataset keeps
    a copy of the context it was made in, so this runs before the datasets are built."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = not quiet
    ctx.print_on_execution_start = not quiet


def panel_rows(cfg: Config, info: DatasetInfo) -> dict:
    """The first `trainer.panel_images` val rows, decoded (the images of TensorBoard's panels)."""
    from components.data.decode import decode_split

    out = decode_split(cfg.data.root, info, cfg.data.val_split, cfg.trainer.panel_images)
    return {k: out[k] for k in ("id", "image", "mask", "valid")}


def fit(cfg: Config, info: DatasetInfo, name: str, teacher: Teacher | None = None) -> Outcome:
    """Run (or resume) one training run to the end; raises TrainingFailedError on failure.

    A run that already reached `trainer.epochs` is not started again: its last checkpoint is
    returned (so re-running a finished command prints its results in seconds)."""
    start = time.perf_counter()
    with run_lock(join(storage_of(cfg), name)):  # the same command started twice: refused
        done = finished_checkpoint(storage_of(cfg), name, cfg.trainer.epochs)
        if done is not None:
            metrics = read_meta(done).get("metrics", {})
            return Outcome(name, metrics, str(done), time.perf_counter() - start, reused=True)
        resolved = resolve_pretrained(cfg)  # `synthetic`: the stage's file, made when missing
        _check_same_run(resolved, name)
        _write_config(cfg, name)  # as given (`pretrained: synthetic`), so --config reruns it
        cfg = resolved
        request = _request(cfg)
        if cfg.trainer.sync_bn and not request.use_gpu and request.num_workers > 1:
            raise ConfigError(
                "'trainer.sync_bn': SyncBatchNorm needs GPU workers (torch has no CPU version); "
                "this run trains on CPUs"
            )
        t = cfg.trainer
        wait_for_resources(request, t.resource_wait_s, autoscale_wait_s=t.autoscale_wait_s)
        if request.per_worker["CPU"] < cfg.trainer.cpus_per_worker:
            print(
                f"this machine's Ray has {cluster_capacity().get('CPU', 0):g} CPUs: each of the "
                f"{request.num_workers} workers reserves {request.per_worker['CPU']:g} CPU "
                f"(trainer.cpus_per_worker={cfg.trainer.cpus_per_worker:g} would not fit)",
                flush=True,
            )
        result = local_mode.fit(build_trainer(cfg, info, name, teacher))
    checkpoint = result.checkpoint
    metrics = dict(result.metrics or {})
    folder = None
    if checkpoint is not None:
        storage = storage_of(cfg)
        folder = (
            str(resolve_checkpoint(join(storage, name))) if is_uri(storage) else checkpoint.path
        )
        if not metrics:
            metrics = read_meta(folder).get("metrics", {})
    outcome = Outcome(name, metrics, folder, time.perf_counter() - start)
    _report_file(cfg, outcome)
    return outcome


def run_summary(cfg: Config, outcome: Outcome) -> list[tuple[str, str]]:
    """A run's summary rows (report.md; the pipelines print theirs beside a teacher's)."""
    m, run = outcome.metrics, join(storage_of(cfg), outcome.name)

    def pct(key: str) -> str:
        return f"{100 * m.get(key, float('nan')):.2f}"

    s = cfg.model
    rows = [
        (
            f"model ({s.backbone} x{s.width}, {s.head}, {cfg.method.name})",
            f"val mIoU {pct('miou')} (best {pct('best_miou')} at epoch {m.get('best_epoch')})",
        ),
    ]
    if "teacher_miou" in m:
        rows.append(("teacher", f"val mIoU {pct('teacher_miou')}"))
    rows += [
        ("epochs", f"{m.get('epoch')} ({m.get('iteration')} iterations)"),
        ("images/s", f"{m.get('images_per_s', float('nan')):.1f} (last epoch)"),
        ("data wait share", f"{100 * m.get('data_wait_share', float('nan')):.1f}% of step time"),
        ("checkpoint (newest)", str(outcome.checkpoint_dir)),
        ("checkpoint (best)", join(run, f"epoch_{m.get('best_epoch', 0):04d}")),
    ]
    return rows


def _report_file(cfg: Config, outcome: Outcome) -> None:
    """report.md in the run folder; a storage error here only warns (the run is done)."""
    from components.training.report import write_run_report

    try:
        write_run_report(join(storage_of(cfg), outcome.name), cfg, run_summary(cfg, outcome))
    except OSError as e:
        print(f"warning: report.md not written ({e})", flush=True)


def failure_message(error: BaseException) -> str:
    """The worker's own error line out of a Ray Train failure (not Ray's traceback)."""
    text = str(error)
    if "worker process has died" in text or "ActorDiedError" in text:
        cause = " (the system's out-of-memory killer, by Ray's account)" if "OOM" in text else ""
        return (
            f"a training worker process died{cause}; nothing was lost past the last checkpoint. "
            "Lower data.batch_size or data.crop_size if memory ran out"
        )
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for marker in ("BadDataError:", "CheckpointError:", "DatasetError:", "ValueError:", "Error:"):
        hits = [ln for ln in lines if marker in ln]
        if hits:
            return hits[-1]
    return lines[-1] if lines else repr(error)


__all__ = [
    "Outcome",
    "Teacher",
    "absolute_storage",
    "build_trainer",
    "failure_message",
    "finished_checkpoint",
    "fit",
    "load_teacher",
    "obtain_teacher",
    "prepare_dataset",
    "run_name",
    "storage_of",
    "teacher_training_config",
]
