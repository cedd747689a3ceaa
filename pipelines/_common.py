"""Shared by the entry scripts: import path, Ray start-up, error reporting."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# `python pipelines/x.py` puts pipelines/ first on sys.path; the project root must be there too
# (under `ray job submit --working-dir .` the package may not be installed on the head node).
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def init_ray(dashboard: bool = False) -> None:
    """Connect to the cluster of RAY_ADDRESS / the submitted job / a local `ray start`, or else
    start a local instance sized by Ray from this machine.

    The local instance has no dashboard unless `dashboard` is set: on a laptop it only takes
    CPU from training (start one with `ray start --head` to have it). Sweeps need it: Ray
    Train's placement-group cleaner asks the dashboard's State API whether a run's controller
    is still alive, and without an answer the workers' placement group of every trial that Tune
    stops (ASHA, or at its last epoch) stays reserved until the sweep ends, so later trials wait
    for ever for the CPUs it holds. A local dashboard listens on 127.0.0.1 only."""
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"))
    except ConnectionError:
        start_local_ray(include_dashboard=dashboard, dashboard_host="127.0.0.1")


def start_local_ray(attempts: int = 3, **kwargs) -> None:
    """`ray.init(**kwargs)` for a new local instance, tried again when the node times out during
    start-up: Ray waits a fixed 30 s for its raylet to register, which a loaded 2-core machine
    can miss (seen in CI-like runs); a second try usually starts in a few seconds.

    A timed-out attempt leaves its GCS, dashboard and monitor processes running (`ray.shutdown`
    does not know them); they are this process's children, so they are stopped here before the
    next try instead of loading the machine for the rest of the session."""
    import ray

    for attempt in range(1, attempts + 1):
        before = _child_pids()
        try:
            ray.init(**kwargs)
            return
        except Exception as e:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(e) or attempt == attempts:
                raise
            print(f"ray start-up timed out (attempt {attempt}/{attempts}); retrying", flush=True)
            ray.shutdown()
            _stop(_child_pids() - before)


def _child_pids() -> set[int]:
    """PIDs of this process's children (Linux /proc; empty elsewhere)."""
    me, found = os.getpid(), set()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == me:
            found.add(int(entry))
    return found


def _stop(pids: set[int], grace_s: float = 2.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`, then reap."""
    import signal
    import time

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        if sig == signal.SIGTERM:
            time.sleep(grace_s)
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except OSError:
            pass


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code
