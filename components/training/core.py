"""The training core: one step and one epoch as plain functions, without Ray.

    optimizer = build_optimizer(method.trainable, cfg.optim)
    schedule = Schedule.of(optimizer, total_iters, cfg.optim)
    progress = {"iteration": 0}
    stats = train_one_epoch(method, batches, optimizer, schedule, progress, steps=100)
    confusion = predict_confusion(method.eval_model(), val_batches, num_classes)  # evaluation.py

The Ray Train worker (`loop.py`) calls these with its dataset shards and adds what is Ray's (DDP,
the all-reduces, report, checkpoint, resume); the benchmarks and tests call them with in-memory
batches. Any iterator of batch dicts will do.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from components.distillation.protocol import MethodBase
from components.training.schedule import Schedule


class BadDataError(RuntimeError):
    """Too many rows failed to decode or validate."""


class NonFiniteLossError(FloatingPointError):
    """A step's loss was NaN or infinite: the run stops before that step is checkpointed."""


@dataclass
class EpochStats:
    """What one epoch did, on this process."""

    steps: int = 0
    wait_s: float = 0.0  # waiting for the next batch
    train_s: float = 0.0  # the whole epoch, waits included
    bad_rows: int = 0  # rows a `valid` column marks undecodable (any stream)
    seen_rows: int = 0
    sums: dict[str, float] = field(default_factory=dict)  # each term summed over the steps
    reported: dict[str, int] = field(default_factory=dict)  # steps that gave each term
    step_s: list[float] = field(default_factory=list)  # each step's wall time, waits excluded

    def means(self) -> dict[str, float]:
        return {k: v / max(1, self.reported[k]) for k, v in self.sums.items()}


def train_step(
    method: MethodBase,
    batch: dict[str, Tensor],
    optimizer: torch.optim.Optimizer,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """Forward (under autocast when given), backward, optimizer step, `method.after_step()`.
    Returns the step's terms."""
    if autocast_dtype is not None:
        with torch.autocast(batch["image"].device.type, dtype=autocast_dtype):
            terms = method.training_step(batch)
    else:
        terms = method.training_step(batch)
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    optimizer.step()
    method.after_step()  # e.g. the EMA teacher's update
    return terms


def train_one_epoch(
    method: MethodBase,
    batches: Iterator[dict[str, Tensor]],
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    progress: dict,
    steps: int,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    on_step: Callable[[int, dict[str, float], float], None] | None = None,
    max_bad_rows: float | None = None,
) -> EpochStats:
    """Up to `steps` steps, fewer if `batches` ends first (the caller checks `stats.steps`).

    Before each step the learning rate is set from `progress["iteration"]`, which then counts
    the step; at the end it is the next step's. `on_step(iteration, {term: value},
    data_wait_s)` runs after each step (logging).

    Stops with NonFiniteLossError at the first NaN or infinite loss (naming the terms), and with
    BadDataError as soon as this process has seen more than `max_bad_rows` bad rows (the
    epoch's limit over all workers: exceeded whatever the others see)."""
    method.trainable.train()
    stats = EpochStats()
    start = time.perf_counter()
    for _ in range(steps):
        t_wait = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            break
        t_step = time.perf_counter()
        stats.wait_s += t_step - t_wait
        for key, valid in batch.items():
            if key.endswith("valid"):
                stats.bad_rows += int((~valid).sum())
                stats.seen_rows += valid.numel()
        if channels_last:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        schedule.apply(optimizer, progress["iteration"])
        terms = train_step(method, batch, optimizer, autocast_dtype)
        stats.step_s.append(time.perf_counter() - t_step)
        stats.steps += 1
        progress["iteration"] += 1
        values = {name: float(value.detach()) for name, value in terms.items()}
        if not math.isfinite(values["loss"]):
            bad = ", ".join(f"{k} {v}" for k, v in values.items() if not math.isfinite(v))
            raise NonFiniteLossError(
                f"non-finite loss at iteration {progress['iteration']} ({bad}); stopped before "
                "it was checkpointed. Lower optim.lr or the loss weights, or check the data"
            )
        if max_bad_rows is not None and stats.bad_rows > max_bad_rows:
            raise BadDataError(
                f"{stats.bad_rows} bad training rows (undecodable, wrong mask size or label ids "
                f"out of range) after {stats.steps} steps: already more than "
                f"data.max_bad_fraction allows this epoch ({int(max_bad_rows)}). The skipped "
                "ids are in the worker logs."
            )
        for name, value in values.items():
            stats.sums[name] = stats.sums.get(name, 0.0) + value
            stats.reported[name] = stats.reported.get(name, 0) + 1
        if on_step is not None:
            on_step(progress["iteration"], values, t_step - t_wait)
    schedule.apply(optimizer, progress["iteration"])  # the rate of the next step, as reported
    stats.train_s = time.perf_counter() - start
    return stats
