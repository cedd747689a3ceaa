"""Ray Data's cold start of each execution, shortened.

Each execution of a dataset (each epoch of a run, each evaluation) builds a new streaming
executor whose resource limits come from Ray Data's autoscaling coordinator actor. Its client
answers without blocking: the first call returns an empty reservation and asks the actor, and
the executor reads its limits again only `ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S`
(1 s) later (ray==2.60.0: ray/data/_internal/execution/resource_manager.py `get_global_limits`;
ray/data/_internal/cluster_autoscaler/default_autoscaling_coordinator.py
`DefaultAutoscalingCoordinator.get_reserved_resources`: "the cached value ... will be empty
until the actor responds"). Until then it runs one task at a time: the second decode task of
every epoch started 1.04 s after the first (measured with `ray.timeline()`, 2026-12-01), about a
third of an epoch of photos on 2 cores.

`refresh_limits_sooner` lowers that interval to LIMITS_REFRESH_S in the calling process. The
executor runs in the process that iterates a dataset (a pipeline's driver) or in the split
coordinator actor that feeds a run's workers; both import this module through
`components.data.tasks` (the coordinator when it unpickles the dataset's functions), which calls
it at import. Where Ray has moved or renamed the constant, nothing is changed (False);
tests/data/test_ray_limits.py checks the effect itself on this Ray.
"""

from __future__ import annotations

# Seconds between reads of the executor's resource limits (Ray's default: 1). Each read asks the
# coordinator actor once: 10 small calls a second while a dataset executes.
LIMITS_REFRESH_S = 0.1


def refresh_limits_sooner(seconds: float = LIMITS_REFRESH_S) -> bool:
    """Make Ray Data's executors in this process read their resource limits every `seconds`
    (never less often than Ray's own default); False when this Ray has no such setting."""
    try:
        from ray.data._internal.execution.resource_manager import ResourceManager
    except ImportError:
        return False
    current = getattr(ResourceManager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S", None)
    if not isinstance(current, (int, float)):
        return False
    ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S = min(current, seconds)
    return True


__all__ = ["LIMITS_REFRESH_S", "refresh_limits_sooner"]
