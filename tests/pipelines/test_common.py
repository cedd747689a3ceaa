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


def test_a_private_instance_runs_its_workers_at_nice_zero(monkeypatch, ray_session):
    """init_ray starts a private instance with LOCAL_RUNTIME_ENV (the test session's instance is
    started the same way): its tasks and actors run at nice 0, like a plain PyTorch program and
    its DataLoader workers, not at Ray's default 15 (benchmarks/loop_overhead.py)."""
    import os

    import ray

    captured = {}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(_common, "recorded_cluster", lambda: None)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(_common, "start_local_ray", lambda **kw: captured.update(kw))
    _common.init_ray()
    assert captured["runtime_env"] == _common.LOCAL_RUNTIME_ENV
    monkeypatch.undo()

    @ray.remote(num_cpus=0)
    def niceness() -> int:
        return os.nice(0)

    @ray.remote(num_cpus=0)
    class Probe:
        def niceness(self) -> int:
            return os.nice(0)

    driver = os.nice(0)  # 0 unless the tests themselves run under `nice`
    assert ray.get(niceness.remote()) == driver  # Ray's default would add 15
    probe = Probe.remote()
    assert ray.get(probe.niceness.remote()) == driver
    ray.kill(probe)
