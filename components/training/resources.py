"""What a training run asks the cluster for, and whether the cluster can ever give it.

Ray Train V2 waits for its placement group and retries a worker group that does not start, for
ever by default: a run asking for 4 GPUs on a 1-GPU cluster without an autoscaler hangs with no
error. The driver checks first:

    request = run_request(cfg.trainer, cluster_capacity().get("GPU", 0) > 0)
    wait_for_resources(request, wait_s=cfg.trainer.resource_wait_s)   # raises ConfigError

- An autoscaling cluster (the autoscaler publishes its node types, e.g. clusters/*.yaml or
  KubeRay) is checked against its *maximum* size at once; the autoscaler adds the nodes.
- A fixed cluster (a local instance, `ray start` by hand) is checked against its nodes now, and
  waited on for up to `wait_s` seconds in case nodes are still joining.
On CPU-only training one CPU beyond the workers' is needed for Ray Data's decode tasks, or the
workers would wait for data for ever.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from components.config import ConfigError, TrainerConfig

DATA_CPUS = 1.0  # a CPU left for Ray Data's decode tasks when training on CPU
MIN_SHARE = 0.25  # the smallest CPU share a worker on a private local instance is given


@dataclass(frozen=True)
class Request:
    num_workers: int
    per_worker: dict[str, float]
    use_gpu: bool

    @property
    def totals(self) -> dict[str, float]:
        out = {k: v * self.num_workers for k, v in self.per_worker.items()}
        if not self.use_gpu:
            out["CPU"] = out.get("CPU", 0.0) + DATA_CPUS
        return out

    def describe(self) -> str:
        bundle = ", ".join(f"{v:g} {k}" for k, v in self.per_worker.items())
        text = f"trainer.num_workers={self.num_workers} x ({bundle})"
        if not self.use_gpu:
            text += f" + {DATA_CPUS:g} CPU for Ray Data"
        return text


def run_request(
    t: TrainerConfig, cluster_has_gpu: bool, local_cpus: float | None = None
) -> Request:
    """The run's resources. `local_cpus`: the CPUs of a private local instance (nothing can
    join it); CPU-only workers that would not fit there reserve a share of them instead of
    `trainer.cpus_per_worker` (2 workers on a 2-core laptop: 0.5 CPU each + 1 for Ray Data).
    The reservation is Ray's bookkeeping; each worker still runs cores/workers torch threads."""
    use_gpu = t.use_gpu if t.use_gpu is not None else cluster_has_gpu
    cpus = float(t.cpus_per_worker)
    if local_cpus is not None and not use_gpu:
        share = (local_cpus - DATA_CPUS) / t.num_workers
        if cpus * t.num_workers + DATA_CPUS > local_cpus and share >= MIN_SHARE:
            cpus = share
    per_worker = {"CPU": cpus}
    if use_gpu:
        per_worker["GPU"] = 1.0
    return Request(t.num_workers, per_worker, use_gpu)


def started_here() -> bool:
    """Whether this process started its Ray instance (a private local one, which no node
    can join and which does not autoscale)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    return bool(node is not None and getattr(node, "head", False))


def _fmt(resources: dict[str, float], keys) -> str:
    return ", ".join(f"{resources.get(k, 0):g} {k}" for k in keys)


def shortfall(request: Request, nodes: list[dict[str, float]]) -> str | None:
    """Why a fixed cluster of `nodes` (each node's total resources) cannot run `request`, or None.

    Each worker needs its whole bundle on one node, and all workers together need the totals."""
    keys = list(request.totals)
    have = {k: sum(n.get(k, 0.0) for n in nodes) for k in keys}
    short = [k for k in keys if request.totals[k] > have[k] + 1e-9]
    if short:
        return (
            f"the run needs {_fmt(request.totals, keys)} "
            f"({request.describe()}) but the cluster has {_fmt(have, keys)}"
        )
    # Placement: fill nodes greedily with worker bundles (a bundle never spans nodes).
    free = [dict(n) for n in nodes]
    placed = 0
    for node in free:
        while placed < request.num_workers and all(
            node.get(k, 0.0) + 1e-9 >= v for k, v in request.per_worker.items()
        ):
            for k, v in request.per_worker.items():
                node[k] = node.get(k, 0.0) - v
            placed += 1
    if placed < request.num_workers:
        bundle = _fmt(request.per_worker, list(request.per_worker))
        sizes = "; ".join(_fmt(n, list(request.per_worker)) for n in nodes)
        return (
            f"only {placed} of trainer.num_workers={request.num_workers} workers of "
            f"({bundle}) fit on the cluster's nodes ({sizes}); a worker cannot span nodes"
        )
    return None


def max_shortfall(request: Request, maximum: dict[str, float]) -> str | None:
    """Why an autoscaling cluster at its largest (`maximum` totals) cannot run `request`."""
    keys = list(request.totals)
    short = [k for k in keys if request.totals[k] > maximum.get(k, 0) + 1e-9]
    if short:
        return (
            f"the run needs {_fmt(request.totals, keys)} ({request.describe()}) but the "
            f"autoscaling cluster has at most {_fmt(maximum, keys)}"
        )
    return None


def _cluster_state() -> tuple[dict[str, float] | None, list[dict[str, float]]]:
    import ray
    from ray._private import state  # the autoscaler's published node types (DeveloperAPI)

    try:
        maximum = state.state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001  (a private API: if it fails, treat the cluster as fixed)
        maximum = None
    nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    return maximum, nodes


def cluster_capacity() -> dict[str, float]:
    """What runs can count on: an autoscaling cluster's maximum (it may have no GPU node yet),
    else the resources of the nodes alive now."""
    maximum, nodes = _cluster_state()
    if maximum:
        return {k: float(v) for k, v in maximum.items()}
    out: dict[str, float] = {}
    for node in nodes:
        for k, v in node.items():
            out[k] = out.get(k, 0.0) + v
    return out


def wait_for_resources(request: Request, wait_s: float, log=print, poll_s: float = 2.0) -> None:
    """Return once the cluster can run `request`; raise ConfigError (with the numbers) when it
    never can, after at most `wait_s` seconds for a cluster without an autoscaler."""
    deadline = time.monotonic() + wait_s
    announced = False
    while True:
        maximum, nodes = _cluster_state()
        if maximum:
            problem = max_shortfall(request, maximum)
            if problem is None:
                return  # the autoscaler brings the nodes
            raise ConfigError(
                f"{problem}; lower trainer.num_workers or raise the cluster's max_workers"
            )
        problem = shortfall(request, nodes)
        if problem is None:
            return
        if started_here():  # this machine's private instance: no node will ever join
            raise ConfigError(
                f"{problem} (this machine's own Ray instance); lower trainer.num_workers or "
                "trainer.cpus_per_worker, or run on a cluster"
            )
        if time.monotonic() >= deadline:
            raise ConfigError(
                f"{problem} (waited {wait_s:g} s for nodes to join; the cluster has no "
                "autoscaler); lower trainer.num_workers or trainer.cpus_per_worker, or add "
                "nodes (trainer.resource_wait_s sets the wait)"
            )
        if not announced:
            log(f"waiting up to {wait_s:g} s for the cluster: {problem}")
            announced = True
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


__all__ = [
    "DATA_CPUS",
    "Request",
    "cluster_capacity",
    "max_shortfall",
    "run_request",
    "shortfall",
    "started_here",
    "wait_for_resources",
]
