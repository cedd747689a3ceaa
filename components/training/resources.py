"""What a training run asks the cluster for, and whether the cluster can ever give it.

Ray Train V2 waits for its placement group and retries a worker group that does not start, for
ever by default: a run asking for 4 GPUs on a 1-GPU cluster without an autoscaler hangs with no
error. The driver checks first:

    request = run_request(cfg.trainer, cluster_capacity().get("GPU", 0) > 0)
    wait_for_resources(request, wait_s=cfg.trainer.resource_wait_s)   # raises ConfigError

- An autoscaling cluster (its autoscaler found: `find_autoscaler`, from the head of a
  clusters/*.yaml cluster, or a KubeRay pod) is checked against its *maximum* size at once, and
  its autoscaler is asked for the nodes.
- A fixed cluster (a local instance, `ray start` by hand) is checked against its nodes now, and
  waited on for up to `wait_s` seconds in case nodes are still joining.
On CPU-only training one CPU beyond the workers' is needed for Ray Data's decode tasks, or the
workers would wait for data for ever.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from components.config import ConfigError, TrainerConfig

DATA_CPUS = 1.0  # a CPU left for Ray Data's decode tasks when training on CPU
MIN_SHARE = 0.25  # the smallest CPU share a worker on a private local instance is given
# How long a run waits for an autoscaler to start its nodes (cloud GPU nodes: minutes to boot,
# pull the image and install; trainer.resource_wait_s is the wait of a fixed cluster).
AUTOSCALE_WAIT_S = 1200.0
CLEAR_AFTER_S = 600.0  # the demand placed for the autoscaler is cleared by then at the latest


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


@dataclass(frozen=True)
class NodeType:
    """A worker node type of an autoscaling cluster: its resources and how many it may have."""

    name: str
    resources: dict[str, float]
    max_workers: int  # -1: no limit of its own


@dataclass(frozen=True)
class Autoscaler:
    """What an autoscaling cluster may grow to: its worker node types and the upper bound over
    all of them (`max_workers` at the top of a cluster YAML; -1: none)."""

    node_types: tuple[NodeType, ...]
    max_workers: int = -1
    source: str = ""
    # False: the cluster autoscales but its node types could not be read (a KubeRay pod whose
    # service account may not read its RayCluster): no limit is checked, demand is placed.
    known: bool = True

    def fits_one(self, bundle: dict[str, float]) -> list[NodeType]:
        return [t for t in self.node_types if t.max_workers != 0 and _holds(t.resources, bundle)]

    def describe(self) -> str:
        if not self.known:
            return f"unknown ({self.source})"
        return "; ".join(
            f"{t.name} ({_fmt(t.resources, _keys(t.resources)) or 'no resources'}, "
            f"max {t.max_workers if t.max_workers >= 0 else 'unlimited'})"
            for t in self.node_types
        )


def _keys(resources: dict[str, float]) -> list[str]:
    """The resources worth naming: not memory, object store or the per-node ids."""
    skip = ("memory", "object_store_memory")
    return [k for k in resources if k not in skip and not k.startswith("node:")]


def _holds(node: dict[str, float], bundle: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items() if v > 0)


def autoscaler_from_config(config: dict, source: str = "") -> Autoscaler | None:
    """The worker node types of a cluster-launcher config (what `ray up` writes to the head as
    ~/ray_bootstrap_config.yaml, with each type's resources filled in from its instance type),
    or None when it has no worker type that can be started."""
    head = config.get("head_node_type")
    types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        if name == head:
            continue
        res = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        types.append(NodeType(name, res, int(spec.get("max_workers", -1))))
    if not any(t.max_workers != 0 for t in types):
        return None
    return Autoscaler(tuple(types), int(config.get("max_workers", -1)), source)


def autoscaler_from_cluster_config(proto, source: str = "") -> Autoscaler | None:
    """The same from Ray's `autoscaler_pb2.ClusterConfig` (the GCS cluster-config key that
    `ray._private.state.state.get_cluster_config()` reads; nothing in Ray 2.60 writes it, an
    operator may)."""
    if proto is None:
        return None
    types = [
        NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, int(g.max_count))
        for g in proto.node_group_configs
        if g.resources.get("node:__internal_head__", 0) == 0
    ]
    if not any(t.max_workers != 0 for t in types):
        return None
    return Autoscaler(tuple(types), -1, source)


def _monitor_config_path(gcs_address: str, proc: str = "/proc") -> str | None:
    """The --autoscaling-config of this cluster's autoscaler process (`ray start --head
    --autoscaling-config=...` starts ray/autoscaler/{_private,v2}/monitor.py with it; without it
    the monitor runs a read-only autoscaler that never adds a node). Only visible from the head
    node, where `ray job submit` runs drivers."""
    port = gcs_address.rsplit(":", 1)[-1]
    for cmdline in Path(proc).glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not any(a.endswith(("autoscaler/_private/monitor.py", "autoscaler/v2/monitor.py"))
                   for a in args):  # fmt: skip
            continue
        if not any(a.startswith("--gcs-address=") and a.rsplit(":", 1)[-1] == port for a in args):
            continue
        for a in args:
            if a.startswith("--autoscaling-config="):
                path = os.path.expanduser(a.split("=", 1)[1])
                if not os.path.isabs(path):
                    try:
                        path = os.path.join(os.readlink(cmdline.parent / "cwd"), path)
                    except OSError:
                        pass
                return path
        return None  # a read-only monitor: this cluster does not autoscale
    return None


def kuberay_autoscaling(environ=None) -> tuple[str, str] | None:
    """(namespace, name) of the RayCluster when this process runs in a KubeRay pod whose
    cluster has in-tree autoscaling, else None. KubeRay sets RAY_CLUSTER_NAME and
    RAY_CLUSTER_NAMESPACE in every Ray container (Ray's own dashboard reads them) and the
    generated `ray start` command in KUBERAY_GEN_RAY_START_CMD; with `enableInTreeAutoscaling`
    the head's command has `--no-monitor` (the autoscaler is the pod's sidecar, not a process of
    this container) and recent KubeRay versions set RAY_enable_autoscaler_v2 (true for v2, false
    for v1) in the head container. A job's driver inherits the head container's environment."""
    environ = os.environ if environ is None else environ
    name, namespace = environ.get("RAY_CLUSTER_NAME"), environ.get("RAY_CLUSTER_NAMESPACE")
    if not name or not namespace:
        return None
    command = environ.get("KUBERAY_GEN_RAY_START_CMD", "")
    if "--no-monitor" in command or "RAY_enable_autoscaler_v2" in environ:
        return namespace, name
    return None


def _read_raycluster(namespace: str, name: str) -> dict:
    """The RayCluster object, read with the pod's service account as the autoscaler sidecar does
    (KubeRay gives the head pod the autoscaler's account, which may get rayclusters)."""
    from ray.autoscaler._private.kuberay.node_provider import KubernetesHttpApiClient

    return KubernetesHttpApiClient(namespace=namespace).get(f"rayclusters/{name}")


def kuberay_autoscaler(environ=None, read=_read_raycluster) -> Autoscaler | None:
    """A KubeRay cluster's autoscaler: its worker groups from the RayCluster, translated by Ray's
    own KubeRay code (what the sidecar scales by), or one of unknown limits when the RayCluster
    cannot be read. None outside an autoscaling KubeRay cluster."""
    found = kuberay_autoscaling(environ)
    if found is None:
        return None
    namespace, name = found
    source = f"KubeRay RayCluster {namespace}/{name}"
    try:
        from ray.autoscaler._private.kuberay.autoscaling_config import (
            _derive_autoscaling_config_from_ray_cr,
        )

        scaler = autoscaler_from_config(
            _derive_autoscaling_config_from_ray_cr(read(namespace, name)), source
        )
    except Exception as e:  # noqa: BLE001  (no permission, no API server, another CR shape)
        return Autoscaler((), -1, f"{source}, unreadable: {type(e).__name__}", known=False)
    return scaler or None  # every group at maxReplicas 0: it cannot grow


KUBERAY_READ_EVERY_S = 60.0  # the RayCluster is read at most this often (runs poll every 2 s)
_kuberay_read: dict[tuple[str, str], tuple[float, Autoscaler | None]] = {}


def _kuberay_autoscaler_cached() -> Autoscaler | None:
    key = kuberay_autoscaling()
    if key is None:
        return None
    hit = _kuberay_read.get(key)
    if hit is None or time.monotonic() - hit[0] >= KUBERAY_READ_EVERY_S:
        hit = _kuberay_read[key] = (time.monotonic(), kuberay_autoscaler())
    return hit[1]


def find_autoscaler() -> Autoscaler | None:
    """This cluster's autoscaler, or None for a fixed cluster. Ray 2.60 publishes no node types
    in the GCS (`get_max_resources_from_cluster_config()` is None: nothing writes the key), so
    the config the autoscaler process was started with is read (on the head of a cluster started
    by `ray up` / `ray start --autoscaling-config`), or, in a KubeRay pod, the RayCluster; the
    GCS key first, in case."""
    import ray
    from ray._private import state

    found = None
    with contextlib.suppress(Exception):  # a private API: if it fails, look for the monitor
        found = autoscaler_from_cluster_config(state.state.get_cluster_config(), "GCS")
    if found is not None:
        return found
    try:
        path = _monitor_config_path(ray.get_runtime_context().gcs_address)
        if path is not None:
            with open(path) as f:
                return autoscaler_from_config(yaml.safe_load(f) or {}, path)
    except Exception:  # noqa: BLE001  (unreadable: treat the cluster as fixed, as before)
        return None
    return _kuberay_autoscaler_cached()


def _head(nodes: list[dict[str, float]]) -> list[dict[str, float]]:
    return [n for n in nodes if n.get("node:__internal_head__", 0) > 0] or nodes[:1]


def maximum_of(scaler: Autoscaler, nodes: list[dict[str, float]]) -> dict[str, float]:
    """An autoscaling cluster's largest totals: the head as it is plus every worker type at its
    max_workers, with no more workers than the cluster-wide max_workers (the largest nodes of
    each resource counted first). An unlimited count gives infinity."""
    out: dict[str, float] = {}
    if not scaler.known:  # limits unknown: what it has now (demand is placed all the same)
        for node in nodes:
            for k, v in node.items():
                out[k] = out.get(k, 0.0) + v
        return out
    for node in _head(nodes):
        for k, v in node.items():
            out[k] = out.get(k, 0.0) + v
    keys = {k for t in scaler.node_types for k in t.resources}
    for k in keys:
        left = scaler.max_workers if scaler.max_workers >= 0 else float("inf")
        total = 0.0
        for t in sorted(scaler.node_types, key=lambda t: -t.resources.get(k, 0.0)):
            per = t.resources.get(k, 0.0)
            count = min(left, t.max_workers if t.max_workers >= 0 else float("inf"))
            if per <= 0 or count <= 0:
                continue
            total += per * count
            left -= count
        out[k] = out.get(k, 0.0) + total
    return out


def launch_plan(request: Request, scaler: Autoscaler, nodes: list[dict[str, float]]):
    """About which nodes the autoscaler starts for `request` ({type: count}; its own choice may
    differ), or None when the workers cannot all be placed even at the cluster's largest."""
    free = [dict(n) for n in nodes]
    bundles = [request.per_worker] * request.num_workers
    if not request.use_gpu:
        bundles = bundles + [{"CPU": DATA_CPUS}]
    started: dict[str, int] = {}
    total = 0
    for bundle in bundles:
        node = next((n for n in free if _holds(n, bundle)), None)
        if node is None:
            options = [
                t
                for t in scaler.fits_one(bundle)
                if t.max_workers < 0 or started.get(t.name, 0) < t.max_workers
            ]
            if not options or 0 <= scaler.max_workers <= total:
                return None
            # the smallest type that holds the bundle (the autoscaler prefers a good fit)
            kind = min(
                options, key=lambda t: sum(t.resources.get(k, 0.0) for k in _keys(t.resources))
            )
            node = dict(kind.resources)
            free.append(node)
            started[kind.name] = started.get(kind.name, 0) + 1
            total += 1
        for k, v in bundle.items():
            node[k] = node.get(k, 0.0) - v
    return started


def _cluster_state() -> tuple[Autoscaler | None, list[dict[str, float]]]:
    import ray

    nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    return find_autoscaler(), nodes


def cluster_capacity() -> dict[str, float]:
    """What runs can count on: an autoscaling cluster's maximum (it may have no GPU node yet),
    else the resources of the nodes alive now."""
    scaler, nodes = _cluster_state()
    if scaler is not None:
        return maximum_of(scaler, nodes)
    out: dict[str, float] = {}
    for node in nodes:
        for k, v in node.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _demand(request: Request) -> list[dict[str, float]]:
    bundles = [dict(request.per_worker) for _ in range(request.num_workers)]
    if not request.use_gpu:
        bundles.append({"CPU": DATA_CPUS})
    return bundles


def _place_demand(bundles: list[dict[str, float]]) -> None:
    """Ask the autoscaler for `bundles` (Ray's one cluster-wide request; [] clears it)."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


_pending_clear: list[threading.Event] = []


def _clear_later(request: Request, within_s: float = CLEAR_AFTER_S, poll_s: float = 2.0) -> None:
    """Clear the demand once the run's placement group exists (its own demand keeps the nodes),
    after `within_s` at the latest, and at exit: a request left behind would keep the nodes
    for ever."""
    import ray

    done = threading.Event()
    _pending_clear.append(done)
    try:
        before = set(ray.util.placement_group_table())
    except Exception:  # noqa: BLE001
        before = set()

    def clear():
        if done.is_set():
            return
        done.set()
        with contextlib.suppress(Exception):  # Ray already shut down: nothing to clear
            _place_demand([])

    def watch():
        deadline = time.monotonic() + within_s
        while not done.is_set() and time.monotonic() < deadline:
            try:
                table = ray.util.placement_group_table()
            except Exception:  # noqa: BLE001
                break
            if any(
                pg_id not in before
                and len(pg.get("bundles", {})) >= request.num_workers
                and pg.get("state") in ("PENDING", "CREATED", "RESCHEDULING")
                for pg_id, pg in table.items()
            ):
                break
            time.sleep(poll_s)
        clear()

    atexit.register(clear)
    threading.Thread(target=watch, name="segdistill-clear-demand", daemon=True).start()


def _wait_for_autoscaler(
    request: Request, scaler: Autoscaler, nodes, wait_s: float, log, poll_s: float
) -> None:
    if not scaler.known:
        return _wait_for_nodes(request, scaler, nodes, {}, wait_s, log, poll_s)
    for bundle in {tuple(sorted(b.items())) for b in _demand(request)}:
        if not scaler.fits_one(dict(bundle)) and not any(_holds(n, dict(bundle)) for n in nodes):
            raise ConfigError(
                f"no node type of the autoscaling cluster can hold one worker of "
                f"({_fmt(dict(bundle), [k for k, _ in bundle])}) ({request.describe()}); node "
                f"types: {scaler.describe()}; lower the per-worker request or add a node type"
            )
    problem = max_shortfall(request, maximum_of(scaler, nodes))
    plan = launch_plan(request, scaler, nodes)
    if problem is None and plan is None:
        problem = (
            f"the workers of {request.describe()} do not all fit on the autoscaling cluster's "
            f"nodes at its largest (node types: {scaler.describe()}; cluster max_workers "
            f"{scaler.max_workers})"
        )
    if problem is not None:
        raise ConfigError(
            f"{problem}; lower trainer.num_workers or raise the cluster's max_workers"
        )
    _wait_for_nodes(request, scaler, nodes, plan, wait_s, log, poll_s)


def _wait_for_nodes(
    request: Request, scaler: Autoscaler, nodes, plan: dict[str, int], wait_s: float, log, poll_s
) -> None:
    """Place the run's demand for the autoscaler and wait until its nodes are there."""
    keys = list(request.totals)
    if shortfall(request, nodes) is None:
        return
    bundles = _demand(request)
    text = ", ".join(f"{n} node{'s' if n > 1 else ''} of type {t}" for t, n in plan.items())
    log(
        f"waiting up to {wait_s:g} s for the autoscaler to start {text or 'nodes'} "
        f"(the run needs {_fmt(request.totals, keys)}: {request.describe()})"
    )
    deadline = time.monotonic() + wait_s
    start = time.monotonic()
    try:
        while True:
            _place_demand(bundles)  # again each time: another driver may have replaced it
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
            _, nodes = _cluster_state()
            problem = shortfall(request, nodes)
            if problem is None:
                log(f"the autoscaler started the nodes in {time.monotonic() - start:.0f} s")
                _clear_later(request)
                return
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"{problem} (waited {wait_s:g} s for the autoscaler to start "
                    f"{text or 'nodes'}; node types: {scaler.describe()}); see `ray status` and "
                    "the head's logs/monitor.* for failed launches (no capacity, quota)"
                )
    except BaseException:
        _place_demand([])  # nothing will use it: let the autoscaler scale back down
        raise


def wait_for_resources(
    request: Request,
    wait_s: float,
    log=print,
    poll_s: float = 2.0,
    autoscale_wait_s: float | None = None,
) -> None:
    """Return once the cluster can run `request`; raise ConfigError (with the numbers) when it
    never can: at once when an autoscaling cluster's largest size is too small, after at most
    `autoscale_wait_s` (default AUTOSCALE_WAIT_S) for its autoscaler to start the nodes, and
    after at most `wait_s` seconds for a cluster without an autoscaler."""
    scaler, nodes = _cluster_state()
    if scaler is not None:
        _wait_for_autoscaler(
            request,
            scaler,
            nodes,
            AUTOSCALE_WAIT_S if autoscale_wait_s is None else autoscale_wait_s,
            log,
            max(poll_s, 0.01),
        )
        return
    deadline = time.monotonic() + wait_s
    announced = False
    while True:
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
        scaler, nodes = _cluster_state()
        if scaler is not None:
            return wait_for_resources(request, wait_s, log, poll_s, autoscale_wait_s)


__all__ = [
    "AUTOSCALE_WAIT_S",
    "DATA_CPUS",
    "Autoscaler",
    "NodeType",
    "Request",
    "autoscaler_from_cluster_config",
    "autoscaler_from_config",
    "cluster_capacity",
    "find_autoscaler",
    "kuberay_autoscaler",
    "kuberay_autoscaling",
    "launch_plan",
    "max_shortfall",
    "maximum_of",
    "run_request",
    "shortfall",
    "started_here",
    "wait_for_resources",
]
