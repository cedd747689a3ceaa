"""A run of one worker on this command's own Ray instance trains in the driver process.

Ray Train's local mode (`ScalingConfig(num_workers=0)`) calls the training function in the
process that calls `fit()`; the datasets are still Ray Data's (`ingest.driver_datasets`). A fit
in worker mode starts a controller, a worker actor and a data coordinator, each a Python
process that imports torch and Ray Data: seconds of set-up and tear-down per fit and most of
the memory of a small run (docs/benchmarks.md). What local mode does not have, and so what this
module does instead:

- checkpoints: Ray keeps a local-mode report's checkpoint in memory only, so the loop writes
  each one into the run folder itself, where Ray's would go (`epoch_NNNN`), and prunes them as
  Ray's `CheckpointConfig` would (`keep_checkpoints`); resume finds them the same way;
- errors: the training function's exception reaches the caller as it was raised, so `fit`
  turns it into the `WorkerGroupError` a worker's failure gives (one message path);
- worker restarts (`trainer.max_failures`): none; a crash ends the command and the same command
  resumes from the newest checkpoint. A run that asks for restarts keeps a worker process.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from components.schema import TrainerConfig
from components.training.checkpoint import checkpoint_folders, read_meta
from components.training.resources import Request, started_here
from components.training.storage import is_uri


def _one_cpu_worker_here(t: TrainerConfig, num_workers: int, gpu: bool) -> bool:
    """One CPU worker, local (or mounted) storage, no worker restarts asked for."""
    return num_workers == 1 and not gpu and t.max_failures == 0 and not is_uri(str(t.storage_path))


def runs_in_driver(t: TrainerConfig, request: Request) -> bool:
    """`trainer.local_mode`, or (None) whether this run is one CPU worker on a Ray instance
    this command started, with local storage and no worker restarts asked for."""
    if t.local_mode is not None:
        return t.local_mode
    return _one_cpu_worker_here(t, request.num_workers, request.use_gpu) and started_here()


def expects_driver(t: TrainerConfig) -> bool:
    """Before Ray starts: whether `runs_in_driver` will say yes on the private instance this
    command is about to start (its GPUs are the ones torch sees, as Ray finds them on one
    machine). Such a command starts Ray without its dashboard, which only Ray Train's
    placement-group cleaner of worker mode needs (pipelines/_common.init_ray)."""
    if t.local_mode is not None:
        return t.local_mode
    import torch

    gpu = t.use_gpu if t.use_gpu is not None else torch.cuda.is_available()
    return _one_cpu_worker_here(t, t.num_workers, gpu)


def keep_checkpoints(run_folder: str | Path, num_to_keep: int, warn=print) -> list[Path]:
    """Delete the run's checkpoint folders that Ray's `CheckpointConfig(num_to_keep,
    checkpoint_score_attribute="miou", checkpoint_score_order="max")` would: keep the
    `num_to_keep` best by val mIoU (ties: the newer), and the newest always. Only the run's own
    `epoch_NNNN` folders are candidates (anything else a user put in the run folder stays).
    Returns the deleted folders."""
    folders = checkpoint_folders(run_folder, warn, pattern="epoch_*")  # oldest first
    if len(folders) <= num_to_keep:
        return []

    def score(item: tuple[int, Path]) -> tuple[float, int]:
        miou = read_meta(item[1]).get("metrics", {}).get("miou", -1.0)
        return (float(miou) if isinstance(miou, (int, float)) else -1.0, item[0])

    ranked = sorted(enumerate(folders), key=score, reverse=True)
    keep = {folder for _, folder in ranked[:num_to_keep]} | {folders[-1]}
    gone = [folder for folder in folders if folder not in keep]
    for folder in gone:
        shutil.rmtree(folder, ignore_errors=True)
    return gone


def driver_inputs(datasets: dict, request: Request, verbose: bool) -> dict:
    """What a fit in the driver needs before its TorchTrainer is made: its datasets as one
    consumer's splits with the training's CPUs kept from Ray Data (`ingest.driver_datasets`),
    and Ray Train's own INFO lines (a "local mode" notice, a dump of every report) kept to
    --verbose, as `LoggingConfig` keeps a worker's."""
    from components.data.ingest import driver_datasets

    if not verbose:
        logging.getLogger("ray.train").setLevel(logging.WARNING)
    return driver_datasets(datasets, request.per_worker["CPU"])


def fit(trainer):
    """`trainer.fit()`; in local mode (`num_workers=0`) a failure of the training function is
    raised as Ray raises a worker's."""
    import ray.train

    if trainer.scaling_config.num_workers != 0:
        return trainer.fit()
    try:
        return trainer.fit()
    except Exception as e:
        raise ray.train.WorkerGroupError(f"{type(e).__name__}: {e}", {0: e}) from e


__all__ = ["driver_inputs", "expects_driver", "fit", "keep_checkpoints", "runs_in_driver"]
