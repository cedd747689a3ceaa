"""A run of one worker trains in the driver (Ray Train's local mode): when, and how its
checkpoints are kept (components/training/local_mode.py). That it trains what a worker trains:
tests/pipelines/test_distill.py::test_the_same_command_gives_the_same_run."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray.train
import torch

from components.schema import TrainerConfig
from components.training import local_mode
from components.training.checkpoint import save_checkpoint
from components.training.local_mode import fit, keep_checkpoints, runs_in_driver
from components.training.resources import Request


def _save(run: Path, epoch: int, miou: float) -> None:
    save_checkpoint(
        run / f"epoch_{epoch:04d}",
        {"w": torch.zeros(1)},
        {"progress": {"iteration": epoch}},
        {"progress": {"epoch": epoch, "iteration": epoch}, "metrics": {"miou": miou}},
    )


def _kept(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir())


def test_keep_checkpoints_keeps_the_best_and_the_newest(tmp_path: Path):
    # As Ray's CheckpointConfig(num_to_keep, score "miou", "max") with Ray's newest kept for
    # resume. Epochs 1-5 with val mIoU 0.3, 0.6, -1 (no evaluation), 0.5, 0.4; worked by hand:
    # num_to_keep=1 keeps epoch 2 (best) and 5 (newest); num_to_keep=2 adds epoch 4.
    run = tmp_path / "run"
    for epoch, miou in enumerate([0.3, 0.6, -1.0, 0.5, 0.4], start=1):
        _save(run, epoch, miou)
    keep_checkpoints(run, 2)
    assert _kept(run) == ["epoch_0002", "epoch_0004", "epoch_0005"]
    gone = keep_checkpoints(run, 1)
    assert [p.name for p in gone] == ["epoch_0004"]
    assert _kept(run) == ["epoch_0002", "epoch_0005"]


def test_keep_checkpoints_ties_keep_the_newer_and_leaves_other_files(tmp_path: Path):
    run = tmp_path / "run"
    _save(run, 1, 0.5)
    _save(run, 2, 0.5)
    _save(run, 3, 0.1)
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "tensorboard").mkdir()
    # A model-only copy a user saved into the run folder: a checkpoint, but not the run's own.
    save_checkpoint(run / "export", {"w": torch.zeros(1)}, None, {"progress": {"iteration": 0}})
    keep_checkpoints(run, 1)
    assert _kept(run) == ["epoch_0002", "epoch_0003", "export", "metrics.jsonl", "tensorboard"]


def _request(workers: int = 1, gpu: bool = False) -> Request:
    return Request(workers, {"CPU": 1.0, **({"GPU": 1.0} if gpu else {})}, gpu)


@pytest.mark.parametrize(
    ("trainer", "request_", "here", "expected"),
    [
        ({}, _request(), True, True),  # the default job on a laptop
        ({}, _request(), False, False),  # a cluster's job: a worker on a worker node
        ({}, _request(workers=2), True, False),
        ({}, _request(gpu=True), True, False),
        ({"max_failures": 2}, _request(), True, False),  # restarts need a worker process
        ({"storage_path": "s3://bucket/runs"}, _request(), True, False),
        ({"local_mode": False}, _request(), True, False),
        ({"local_mode": True}, _request(), False, True),
    ],
)
def test_runs_in_driver(monkeypatch, trainer, request_, here, expected):
    monkeypatch.setattr(local_mode, "started_here", lambda: here)
    assert runs_in_driver(TrainerConfig(**trainer), request_) is expected


def test_a_failure_in_the_driver_is_raised_as_a_workers():
    """The pipelines print a worker's failure without Ray's traceback (trainer.failure_message);
    in local mode the loop's exception is turned into the same WorkerGroupError."""
    from components.training.core import BadDataError
    from components.training.trainer import failure_message

    class Trainer:
        scaling_config = ray.train.ScalingConfig(num_workers=0)

        def fit(self):
            raise BadDataError("row 'x7' of train-00001.parquet: mask has 3 channels")

    with pytest.raises(ray.train.TrainingFailedError) as caught:
        fit(Trainer())
    assert failure_message(caught.value) == (
        "BadDataError: row 'x7' of train-00001.parquet: mask has 3 channels"
    )
    assert isinstance(caught.value.__cause__, BadDataError)


def test_expects_driver_before_ray_starts(monkeypatch):
    """The same rule before Ray starts (the command then starts Ray without its dashboard),
    with the GPUs torch sees standing in for the ones Ray will find."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local_mode.expects_driver(TrainerConfig())
    assert not local_mode.expects_driver(TrainerConfig(num_workers=2))
    assert not local_mode.expects_driver(TrainerConfig(local_mode=False))
    assert not local_mode.expects_driver(TrainerConfig(use_gpu=True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not local_mode.expects_driver(TrainerConfig())
