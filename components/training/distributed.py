"""Collectives of the Ray worker: sums and term means across workers (gloo or NCCL)."""

from __future__ import annotations

import os

import ray.train.torch
import torch
import torch.distributed as dist


def set_cpu_threads(setting: int | None) -> None:
    """A CPU worker's torch threads: `trainer.torch_threads`, else this node's cores shared by
    its workers. Ray sets OMP_NUM_THREADS to a worker actor's CPUs (1), which torch would
    follow; a run in the driver (local mode) would keep torch's own default. Both ways train
    with the same count, so they train the same floats."""
    local_workers = max(1, ray.train.get_context().get_local_world_size())
    torch.set_num_threads(setting or max(1, (os.cpu_count() or 1) // local_workers))


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum across workers, in place. NCCL only reduces CUDA tensors, so a CPU tensor (step
    counts, loss sums) makes the round trip through the worker's GPU."""
    if distributed():
        if dist.get_backend() == "nccl" and t.device.type != "cuda":
            on_gpu = t.to(ray.train.torch.get_device())
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            t.copy_(on_gpu.cpu())
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def mean_terms(sums: dict[str, float], reported: dict[str, int], world: int) -> dict:
    """Each term's mean over the steps (of all workers) that reported it. A diagnostic that only
    some steps give (e.g. `pseudo_acc`) is averaged over those; the names are gathered first, so
    workers whose sets differ still all-reduce the same vector."""
    names = sorted(sums)
    if distributed():
        gathered: list = [None] * world
        dist.all_gather_object(gathered, names)
        names = sorted(set().union(*gathered))
    if not names:
        return {}
    table = torch.tensor(
        [[sums.get(k, 0.0), float(reported.get(k, 0))] for k in names], dtype=torch.float64
    )
    table = all_reduce_sum(table)
    return {k: float(total) / max(1.0, float(n)) for k, (total, n) in zip(names, table.tolist())}
