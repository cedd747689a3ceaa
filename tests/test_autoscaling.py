"""A cold autoscaling cluster scales up for a run and back down after it (team issue 25).

A local autoscaling cluster: `ray start --head --autoscaling-config=...` with Ray's fake
multi-node provider (each "node" is another raylet on this machine), its worker node types read
from clusters/aws-gpu.yaml and scaled down (1 CPU a node, GPUs dropped, at most 2 of a type,
idle timeout 6 s), its head with 0 CPUs, as on AWS. A tiny distillation run is started against
it from zero workers, as `ray job submit` runs a driver on the head (RAY_ADDRESS set); it must
wait for the autoscaler, finish, and the cluster must shrink back to its head.
`ray.cluster_utils.AutoscalingCluster` is not used: its start and shutdown run `ray stop --force`,
which would stop every Ray instance of this user (the test session's own among them). Only this
head's process session is stopped here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from ray_heads import RAY, free_port, stop_session, tail, token_env

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
        }
    return {
        "cluster_name": "segdistill-fake",
        "max_workers": 4,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
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


@pytest.fixture
def cold_cluster():
    tmp = Path(tempfile.mkdtemp(prefix="sda-", dir="/tmp"))  # short: unix socket paths
    port = free_port()
    from ray._private.services import get_node_ip_address

    address = f"{get_node_ip_address()}:{port}"  # where `ray start --head` listens
    config = tmp / "autoscaling.json"
    config.write_text(json.dumps(fake_config(address)))
    env = token_env(tmp, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    command = [
        RAY, "start", "--head", "--block", "--disable-usage-stats",
        f"--port={port}", "--num-cpus=0",
        f"--autoscaling-config={config}",
        f"--dashboard-port={free_port()}", "--dashboard-host=127.0.0.1",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--temp-dir={tmp}/ray",
    ]  # fmt: skip
    with open(tmp / "head.log", "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
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
        yield {"address": address, "env": env, "tmp": tmp}
    finally:
        survivors = stop_session(proc.pid)
        proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
        assert not survivors, f"cluster processes survived: {survivors}"


def _monitor_log(cluster) -> str:
    logs = cluster["tmp"] / "ray" / "session_latest" / "logs"
    return "\n".join(tail(p, 30) for p in sorted(logs.glob("monitor.*")) if p.is_file())


def test_cold_autoscaling_cluster_scales_up_for_a_run_and_down_after(
    cold_cluster, tiny_data, tiny_overrides
):
    start = time.monotonic()
    env = dict(cold_cluster["env"], RAY_ADDRESS=cold_cluster["address"])
    env["SEGDISTILL_CACHE"] = str(cold_cluster["tmp"] / "cache")
    runs = cold_cluster["tmp"] / "runs"
    args = tiny_overrides(
        tiny_data, str(runs), **{"method.name": "none", "trainer.num_workers": "2"}
    )
    out = subprocess.run(
        [sys.executable, "pipelines/distill.py", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    text = out.stdout + out.stderr
    assert out.returncode == 0, f"{text[-6000:]}\n--- monitor:\n{_monitor_log(cold_cluster)}"
    assert "for the autoscaler to start" in text, text[-3000:]
    assert sorted(runs.glob("distill-none-*/*/meta.json")), text[-3000:]
    # Back to the head alone: idle nodes go after 6 s once the demand is cleared.
    deadline = time.monotonic() + 120
    while (alive := _alive_nodes(cold_cluster["address"], cold_cluster["env"])) > 1:
        assert time.monotonic() < deadline, (
            f"{alive} nodes still alive 120 s after the run:\n{_monitor_log(cold_cluster)}"
        )
        time.sleep(3)
    print(f"scaled up, ran and scaled down in {time.monotonic() - start:.0f} s")
