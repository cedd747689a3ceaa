"""pipelines/_common.py: a timed-out Ray start-up does not leave its processes behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipelines import _common


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_failed_start_attempt_processes_are_stopped(monkeypatch):
    import ray

    spawned = []

    def fake_init(**kwargs):
        # Like a real attempt: child processes start, then the raylet misses its 30 s window.
        spawned.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
        if len(spawned) == 1:
            raise Exception("The current node timed out during startup. ...")  # noqa: TRY002  (as Ray does)

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    _common.start_local_ray(attempts=3)
    try:
        assert len(spawned) == 2
        assert spawned[0].poll() is not None  # the failed attempt's process was stopped
        assert spawned[1].poll() is None  # the successful attempt's process was left alone
        assert spawned[1].pid in _common._child_pids()
    finally:
        spawned[1].kill()
        spawned[1].wait()


def test_other_start_errors_are_raised_at_once(monkeypatch):
    import ray

    calls = []

    def fake_init(**kwargs):
        calls.append(1)
        raise RuntimeError("address already in use")

    monkeypatch.setattr(ray, "init", fake_init)
    with pytest.raises(RuntimeError, match="address already in use"):
        _common.start_local_ray(attempts=3)
    assert calls == [1]
