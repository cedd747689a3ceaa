"""pipelines/_common.py: a timed-out Ray start-up does not leave its processes behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


_AT_EXIT = """
import atexit, json, os, sys
sys.path.insert(0, {root!r})
import ray
from pipelines._common import quiet_environment, start_local_ray

seen = []
atexit.register(lambda: open({out!r}, "w").write(json.dumps(seen)))  # runs after ours
quiet_environment(False)
path = os.environ["RAY_DATA_LOGGING_CONFIG"]
start_local_ray(num_cpus=1, include_dashboard=False)
real = ray.shutdown
def spy(*args, **kwargs):
    seen.append(os.path.exists(path))
    return real(*args, **kwargs)
ray.shutdown = spy
"""


def test_ray_stops_before_its_data_logging_config_is_removed(tmp_path):
    """Ray Data's processes read the logging config `quiet_environment` writes to a temp file.
    Ray's own at-exit shutdown is registered at its import, so it ran after our removal of the
    file, and a process Ray started in between (Ray Data's detached autoscaling coordinator, as
    a dataset's last execution ends) printed a FileNotFoundError traceback at the end of
    evaluate.py (seen in about one run in two on the 64-image split). Our at-exit removal now
    stops Ray first: at that shutdown the file still exists, and afterwards it is gone."""
    import json

    out = tmp_path / "seen.json"
    root = str(Path(__file__).parents[2])
    skip = ("RAY_ADDRESS", "RAY_DATA_LOGGING_CONFIG")
    env = {k: v for k, v in os.environ.items() if k not in skip}
    code = _AT_EXIT.format(root=root, out=str(out))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=False, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(out.read_text()) == [True]


_STOP = """
import atexit, json, sys
sys.path.insert(0, {root!r})
import ray
from pipelines._common import start_local_ray

stopped = []
atexit.register(lambda: open({out!r}, "w").write(json.dumps(stopped)))  # runs after ours
start_local_ray(num_cpus=1, include_dashboard=False)
node = ray._private.worker._global_node
pids = {{kind: [p.process.pid for p in infos] for kind, infos in node.all_processes.items()}}
real = node._kill_process_type
def spy(kind, *args, **kwargs):
    stopped.append([kind, pids.get(kind, [])])
    return real(kind, *args, **kwargs)
node._kill_process_type = spy
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_a_private_instance_stops_its_monitor_first_and_leaves_nothing(tmp_path):
    """At exit, `stop_local_ray` stops the instance's autoscaler monitor before Ray's own
    shutdown stops the GCS (after which the monitor spent a second trying to report through it
    and was killed: pipelines/_common.py), and every process of the instance is gone."""
    import json
    import time

    out = tmp_path / "stopped.json"
    root = str(Path(__file__).parents[2])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    code = _STOP.format(root=root, out=str(out))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=False, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    stopped = json.loads(out.read_text())
    kinds = [kind for kind, _ in stopped]
    assert kinds and kinds[0] == "monitor", kinds  # empty: Ray stopped it after our at-exit dump
    assert kinds.index("gcs_server") > 0 and "raylet" in kinds, kinds
    pids = [pid for _, group in stopped for pid in group]
    deadline = time.monotonic() + 10
    while (
        alive := [p for p in pids if Path(f"/proc/{p}").exists()]
    ) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, alive
