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

Two changes, both in the calling process:
- `refresh_limits_sooner` lowers that interval to LIMITS_REFRESH_S (0.1 s).
- `answer_first_read` makes each executor's first read of its reservation wait for the actor's
  answer (a local actor call, 1-3 ms, once an execution) instead of taking the empty one. With the
  0.1 s refresh alone, an epoch of the 48 px synthetic set still ran its first decode task alone
  for 0.1 s: its three tasks ran one after another and the first batch came 0.21 s into the
  epoch; with the answered first read, 0.12 s (`ray.timeline()`, 2026-12-01, docs/benchmarks.md).

The executor runs in the process that iterates a dataset (a pipeline's driver) or in the split
coordinator actor that feeds a run's workers; both import this module through
`components.data.tasks` (the coordinator when it unpickles the dataset's functions), which calls
`shorten_cold_start` at import. Where Ray has moved or renamed what these change, nothing is
changed (False); tests/data/test_ray_limits.py checks the effects themselves on this Ray.
"""

from __future__ import annotations

import functools

# Seconds between reads of the executor's resource limits (Ray's default: 1). Each read asks the
# coordinator actor once: 10 small calls a second while a dataset executes.
LIMITS_REFRESH_S = 0.1
# The longest an execution's first read waits for the coordinator's answer (1-3 ms when its actor
# is up). Past it Ray's own path follows: the empty answer, the call kept pending and its answer
# read at the next refresh, so waiting longer than the refresh interval gains nothing.
FIRST_READ_TIMEOUT_S = LIMITS_REFRESH_S
_ANSWERED = "_segdistill_first_read_answered"


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


def answer_first_read(timeout_s: float = FIRST_READ_TIMEOUT_S) -> bool:
    """Make the first `get_reserved_resources` of each Ray Data coordinator client in this process
    wait (up to `timeout_s`) for the actor's answer rather than return the empty cache; later
    reads are Ray's own. False when this Ray's client does not look as expected (then nothing
    is changed). Idempotent."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            DefaultAutoscalingCoordinator as Client,
        )
    except ImportError:
        return False
    original = getattr(Client, "get_reserved_resources", None)
    if original is None:
        return False
    if getattr(original, _ANSWERED, False):
        return True
    try:  # the client's state as ray==2.60.0 keeps it; constructing one starts no actor
        probe = vars(Client(requester_id="segdistill-probe"))
    except Exception:  # noqa: BLE001 - a changed constructor: leave Ray as it is
        return False
    if not {"_cached_reserved_resources", "_pending_reserved_resources", "_requester_id"} <= set(
        probe
    ):
        return False

    @functools.wraps(original)
    def get_reserved_resources(self):
        state = vars(self)
        if not state.get(_ANSWERED):
            state[_ANSWERED] = True
            if (
                state["_pending_reserved_resources"] is None
                and not state["_cached_reserved_resources"]
            ):
                import ray

                ref = self._autoscaling_coordinator.get_reserved_resources.remote(
                    self._requester_id
                )
                try:
                    state["_cached_reserved_resources"] = ray.get(ref, timeout=timeout_s)
                except ray.exceptions.GetTimeoutError:
                    state["_pending_reserved_resources"] = ref  # Ray's path reads it later
                except ray.exceptions.RayError:
                    pass  # an actor error: Ray's own path follows (it logs and retries)
        return original(self)

    setattr(get_reserved_resources, _ANSWERED, True)
    Client.get_reserved_resources = get_reserved_resources
    return True


def shorten_cold_start() -> bool:
    """Both changes; True when both took effect on this Ray."""
    refreshed = refresh_limits_sooner()
    answered = answer_first_read()
    return refreshed and answered


__all__ = [
    "FIRST_READ_TIMEOUT_S",
    "LIMITS_REFRESH_S",
    "answer_first_read",
    "refresh_limits_sooner",
    "shorten_cold_start",
]
