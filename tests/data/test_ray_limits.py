"""Ray Data's cold start of each execution (components/data/ray_limits.py).

Without the changes, an execution ran one task at a time for its first second: the executor's
resource limits are empty until Ray Data's autoscaling coordinator answers, and it read them
again only 1 s later (ray==2.60.0, measured 2026-12-01: the second task of an epoch started
1.04 s after the first). These tests fail on that behaviour (checked with both changes undone:
the second task started only once the first had ended; with the refresh back at 1 s and the
first read left to Ray, the same).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from functools import partial

import numpy as np
import pytest

from components.data.tasks import seeded_by_epoch

TASK_S = 1.0


def _starts(ray, through_split: bool) -> list[float]:
    def timed(batch: dict, seed) -> dict:  # nested: pickled by value for the task workers
        start = time.time()
        time.sleep(TASK_S)
        return {"pid": np.array([os.getpid()]), "start": np.array([start])}

    # seeded_by_epoch (components.data.tasks) as a run's decoders are wrapped: the process that
    # runs the executor imports that module when it unpickles the function
    ds = ray.data.from_items([{"i": i} for i in range(4)], override_num_blocks=4).map_batches(
        partial(seeded_by_epoch, decode=timed, seed=0), batch_size=1
    )
    it = ds.streaming_split(1)[0] if through_split else ds
    return sorted(row["start"] for row in it.iter_rows())


@pytest.mark.parametrize("through_split", [False, True], ids=["driver", "split-coordinator"])
def test_an_execution_runs_tasks_side_by_side_from_its_start(ray_session, through_split):
    ray = ray_session
    _starts(ray, through_split)  # worker processes started and warm
    starts = _starts(ray, through_split)
    # 4 tasks of 1 s on the session's 3 CPUs: the second starts with the first, not ~1 s later
    assert starts[1] - starts[0] < 0.5, starts


def test_the_first_read_is_answered_without_the_refresh(ray_session, monkeypatch):
    """The answered first read alone: with Ray's 1 s refresh, the execution still has its
    limits from its start (the refresh alone would start the second task ~1 s late)."""
    from ray.data._internal.execution.resource_manager import ResourceManager

    monkeypatch.setattr(ResourceManager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S", 1)
    ray = ray_session
    _starts(ray, through_split=False)
    starts = _starts(ray, through_split=False)
    assert starts[1] - starts[0] < 0.5, starts


def test_importing_the_tasks_module_shortens_the_cold_start():
    code = (
        "from ray.data._internal.execution.resource_manager import ResourceManager as R\n"
        "from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (\n"
        "    DefaultAutoscalingCoordinator as C)\n"
        "first = lambda: getattr(C.get_reserved_resources, '_segdistill_first_read_answered', 0)\n"
        "before = R.GLOBAL_LIMITS_UPDATE_INTERVAL_S, int(first())\n"
        "import components.data.tasks\n"
        "print(*before, R.GLOBAL_LIMITS_UPDATE_INTERVAL_S, int(first()))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    ).stdout.split()
    from components.data.ray_limits import LIMITS_REFRESH_S

    assert [float(v) for v in out] == [1.0, 0, LIMITS_REFRESH_S, 1]
