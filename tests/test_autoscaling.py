"""A cold autoscaling cluster scales up for a run and back down after it (team issue 25).

A local autoscaling cluster: `ray start --head --autoscaling-config=...` with Ray's fake
multi-node provider (each "node" is another raylet on this machine) and autoscaler v2 (as `ray up`
starts it), its worker node types read from clusters/aws-gpu.yaml with their priorities and
scaled down (1 CPU a node, GPUs dropped, at most 2 of a type, idle timeout 6 s), its head with
0 CPUs, as on AWS. One cluster serves the module (Ray starts
once); each test starts from zero workers, as `ray job submit` runs a driver on the head
(RAY_ADDRESS set), and ends with the cluster shrunk back to its head:
- a tiny distillation run waits for the autoscaler and trains; a worker node killed mid-run (its
  raylet, as a reclaimed spot instance vanishes without a drain) is replaced by the autoscaler
  and the run resumes from its last checkpoint (`trainer.max_failures=1`) and finishes;
- a two-trial sweep (pipelines/tune.py, automatic concurrency) runs both trials at once.
`ray.cluster_utils.AutoscalingCluster` is not used: its start and shutdown run `ray stop --force`,
which would stop every Ray instance of this user (the test session's own among them). Only this
head's process session is stopped here."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID
from ray_heads import RAY, free_port, session_members, stop_session, tail, token_env

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def fake_config(gcs_address: str) -> dict:
    """clusters/aws-gpu.yaml's node types for the fake multi-node provider."""
    aws = yaml.safe_load((ROOT / "clusters" / "aws-gpu.yaml").read_text())
    head = aws["head_node_type"]
    types = {
        "ray.head.default": {  # the fake provider's fixed head type name
            "resources": dict(aws["available_node_types"][head]["resources"]),
            "node_config": {},
            "max_workers": 0,
        }
    }
    for name, spec in aws["available_node_types"].items():
        if name == head:
            continue
        types[name] = {
            "resources": {"CPU": 1},  # GPUs dropped: a CPU run, 1 CPU a node
            "node_config": {},
            "min_workers": 0,
            "max_workers": min(int(spec["max_workers"]), 2),
            "priority": int(spec.get("priority", 0)),  # spot before on-demand (autoscaler v2)
        }
    return {
        "cluster_name": "segdistill-fake",
        "max_workers": 4,
        "provider": {
            # Ray's fake multi-node provider, named as an external one: autoscaler v2 reads
            # the provider's defaults file, which the 2.60 wheel lacks for "fake_multinode".
            "type": "external",
            "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
            # autoscaler v2, as `ray up` starts it since Ray 2.50 (RAY_enable_autoscaler_v2=1)
            "launch_multiple": True,
            "head_node_id": FAKE_HEAD_NODE_ID,
        },
        "available_node_types": types,
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


def _alive_nodes(address: str, env: dict) -> int:
    # The autoscaler's events ("Removing 1 nodes of type ...") reach this driver's stdout too.
    code = "import ray; ray.init(address=%r); print('NODES', sum(n['Alive'] for n in ray.nodes()))"
    out = subprocess.run(
        [sys.executable, "-c", code % address],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    return int([ln for ln in out.stdout.splitlines() if ln.startswith("NODES ")][-1].split()[1])


@pytest.fixture(scope="module")
def cold_cluster():
    tmp = Path(tempfile.mkdtemp(prefix="sda-", dir="/tmp"))  # short: unix socket paths
    port = free_port()
    from ray._private.services import get_node_ip_address

    address = f"{get_node_ip_address()}:{port}"  # where `ray start --head` listens
    config = tmp / "autoscaling.json"
    config.write_text(json.dumps(fake_config(address)))
    env = token_env(
        tmp,
        RAY_FAKE_CLUSTER="1",
        AUTOSCALER_UPDATE_INTERVAL_S="1",
        # The GCS sees a killed node dead within ~3 s (Ray's default: 5 x 3 s).
        RAY_health_check_period_ms="1000",
        RAY_health_check_failure_threshold="3",
    )
    command = [
        RAY, "start", "--head", "--block", "--disable-usage-stats",
        f"--port={port}", "--num-cpus=0",
        f"--autoscaling-config={config}",
        f"--dashboard-port={free_port()}", "--dashboard-host=127.0.0.1",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--temp-dir={tmp}/ray",
    ]  # fmt: skip
    # The head runs autoscaler v2 as `ray up` does (the fake provider's head id stands in for
    # the cloud instance id that v2 needs); drivers get the plain environment.
    head_env = dict(
        env,
        RAY_enable_autoscaler_v2="1",
        RAY_CLOUD_INSTANCE_ID=FAKE_HEAD_NODE_ID,
        RAY_NODE_TYPE_NAME="ray.head.default",
    )
    with open(tmp / "head.log", "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=head_env,
                                start_new_session=True)  # fmt: skip
    try:
        deadline, last = time.monotonic() + 180, ""
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited {proc.returncode}:\n{tail(tmp / 'head.log')}")
            try:
                if _alive_nodes(address, env) == 1:
                    break
            except (subprocess.SubprocessError, ValueError, IndexError) as e:
                last = getattr(e, "stderr", None) or repr(e)
            if time.monotonic() > deadline:
                pytest.fail(f"no head at {address}: {last}\n{tail(tmp / 'head.log')}")
            time.sleep(2)
        yield {"address": address, "env": env, "tmp": tmp, "sid": proc.pid}
    finally:
        survivors = stop_session(proc.pid)
        proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
        assert not survivors, f"cluster processes survived: {survivors}"


def _monitor_log(cluster) -> str:
    logs = cluster["tmp"] / "ray" / "session_latest" / "logs"
    return "\n".join(tail(p, 30) for p in sorted(logs.glob("monitor.*")) if p.is_file())


def _job_env(cluster) -> dict[str, str]:
    env = dict(cluster["env"], RAY_ADDRESS=cluster["address"])
    env["SEGDISTILL_CACHE"] = str(cluster["tmp"] / "cache")
    return env


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _node_id(pid: int) -> str | None:
    """The node id of a raylet process (`--node_id=...`), else None."""
    args = _cmdline(pid)
    if not args or not args[0].endswith("raylet"):
        return None
    return next((a.split("=", 1)[1] for a in args if a.startswith("--node_id=")), None)


def _raylets(sid: int) -> list[str]:
    return [n for pid in session_members(sid) if (n := _node_id(pid))]


def _wait_scaled_down(cluster, within_s: float = 120.0) -> None:
    """Back to the head alone: idle nodes go after 6 s once no demand is left. Polled on the
    process table (cheap), then confirmed by the GCS."""
    deadline = time.monotonic() + within_s
    while len(alive := _raylets(cluster["sid"])) > 1:
        assert time.monotonic() < deadline, (
            f"nodes {alive} still up {within_s:g} s after the run:\n{_monitor_log(cluster)}"
        )
        time.sleep(1)
    while (alive := _alive_nodes(cluster["address"], cluster["env"])) > 1:
        assert time.monotonic() < deadline, f"the GCS still counts {alive} nodes"
        time.sleep(1)


def _kill_train_worker_node(sid: int) -> str | None:
    """SIGKILL the raylet (and its agents) of the node a Ray Train worker of this cluster runs
    on, as a reclaimed spot instance vanishes (no drain). Returns the node id, or None when no
    Train worker runs yet."""
    members = session_members(sid)
    for pid in members:
        if not (_cmdline(pid) or [""])[0].startswith("ray::RayTrainWorker"):
            continue
        raylet = _ppid(pid)
        node = _node_id(raylet)
        if node is None:
            continue
        doomed = [raylet, pid] + [
            p for p in members if any(a.endswith(f"={node}") for a in _cmdline(p)[1:])
        ]
        for p in doomed:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return node
    return None


def _registered_checkpoint(runs: Path) -> bool:
    """Whether Ray Train has recorded a checkpoint of the run (its checkpoint manager's snapshot
    names one). Files on storage alone are not enough: a worker group restarted between the
    upload and Ray's record starts from Ray's previous checkpoint (here: from scratch), since
    the driver's own fallback (`resume_folder`) is computed once, before the fit."""
    for snapshot in runs.glob("distill-none-*/checkpoint_manager_snapshot.json"):
        try:
            if "epoch_0" in snapshot.read_text():
                return True
        except OSError:
            pass
    return False


def test_a_cold_cluster_scales_up_replaces_a_lost_node_and_scales_down(
    cold_cluster, tiny_data, tiny_overrides
):
    """distill.py with 2 workers from zero nodes; once its first checkpoint is written, the node
    of a Train worker is killed. Train restarts the worker group (trainer.max_failures=1), the
    autoscaler replaces the node, the run resumes from the checkpoint and finishes; then the
    idle nodes go."""
    start = time.monotonic()
    runs = cold_cluster["tmp"] / "runs"
    epochs = 3
    args = tiny_overrides(
        tiny_data,
        str(runs),
        **{
            "method.name": "none",
            "trainer.num_workers": "2",
            "trainer.epochs": str(epochs),
            "trainer.max_failures": "1",
        },
    )
    log = cold_cluster["tmp"] / "distill.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "pipelines/distill.py", *args],
            cwd=ROOT, env=_job_env(cold_cluster), stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        killed = None
        deadline = time.monotonic() + 400
        while killed is None:
            assert proc.poll() is None, f"the run ended before a node was lost:\n{tail(log, 60)}"
            assert time.monotonic() < deadline, f"no checkpoint in 400 s:\n{tail(log, 60)}"
            if _registered_checkpoint(runs):
                killed = _kill_train_worker_node(cold_cluster["sid"])
            time.sleep(0.2)
        rc = proc.wait(timeout=500)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text(errors="replace")
    (folder,) = runs.glob("distill-none-*")
    console = (folder / "console.log").read_text(errors="replace")
    more = f"\n--- console.log:\n{console[-3000:]}\n--- monitor:\n{_monitor_log(cold_cluster)}"
    assert rc == 0, f"{text[-6000:]}{more}"
    assert "for the autoscaler to start" in text, text[-3000:]
    assert "resumed from checkpoint: epoch" in console, f"{text[-4000:]}{more}"
    # It trained every epoch once: metrics.jsonl is truncated to the checkpoint on resume.
    rows = [json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines() if ln]
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1)), rows
    assert 0.0 <= rows[-1]["miou"] <= 1.0
    metas = [json.loads(p.read_text()) for p in folder.glob("*/meta.json")]
    assert max(m["metrics"]["epoch"] for m in metas) == epochs
    assert killed not in _raylets(cold_cluster["sid"])
    monitor = "\n".join(
        f.read_text(errors="replace")
        for f in (cold_cluster["tmp"] / "ray" / "session_latest" / "logs").glob("monitor.log*")
    )
    launched = re.findall(r"Launching \d+ nodes of type (\S+?)\.?$", monitor, re.MULTILINE)
    assert launched and launched[0].endswith(".spot"), launched  # spot first (priority 10)
    _wait_scaled_down(cold_cluster)
    print(
        f"lost node {killed[-5:]}, resumed, finished, scaled down: {time.monotonic() - start:.0f} s"
    )


def test_a_two_trial_sweep_scales_a_cold_cluster_up_and_down(
    cold_cluster, tiny_data, tiny_overrides
):
    """Automatic concurrency counts the cluster at its largest (4 one-CPU nodes): 2 trials of
    one worker (+ a CPU for Ray Data each) at once; their Train placement groups and Ray Data
    tasks are the demand the autoscaler sees."""
    start = time.monotonic()
    _wait_scaled_down(cold_cluster)  # from zero workers, whatever ran before
    storage = cold_cluster["tmp"] / "sweeps"
    fixed = dict(
        item.split("=", 1)
        for item in tiny_overrides(
            tiny_data, str(storage), **{"method.name": "none", "trainer.num_workers": "1"}
        )
    )
    sweep = {
        "overrides": fixed,
        "search": {"optim.lr": "grid([0.02, 0.01])"},
        "sweep": {"name": "cold", "num_samples": 1, "scheduler": "fifo"},
    }
    path = cold_cluster["tmp"] / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    out = subprocess.run(
        [sys.executable, "pipelines/tune.py", "--config", str(path)], cwd=ROOT,
        env=_job_env(cold_cluster), capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    text = out.stdout + out.stderr
    assert out.returncode == 0, f"{text[-6000:]}\n--- monitor:\n{_monitor_log(cold_cluster)}"
    assert "at most 2 trial(s) at once" in text, text[-3000:]
    rows = (storage / "cold" / "trials.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",done," in r for r in rows[1:]), rows
    assert len(sorted((storage / "cold" / "runs").glob("train-*/*/meta.json"))) == 2
    _wait_scaled_down(cold_cluster)
    print(f"sweep: scaled up, ran 2 trials and scaled down in {time.monotonic() - start:.0f} s")
