"""`ray job submit` for real: a head started with `ray start --head` on loopback, the working dir
uploaded as users do it, a tiny distillation job whose checkpoint lands in a `file://` URI
storage path. Only this head is stopped (by its process session), never the test session's Ray
or anything else on the machine. (A run too big for the cluster is tested in test_distill.py.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from ray_heads import RAY, free_port, stop_session, tail, token_env

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def head():
    # A short folder: Ray's unix socket paths must stay under ~107 characters.
    tmp = Path(tempfile.mkdtemp(prefix="sdj-", dir="/tmp"))
    env = token_env(tmp)  # token authentication, as a head should run
    dashboard = free_port()
    command = [
        RAY, "start", "--head", "--block", "--disable-usage-stats",
        f"--port={free_port()}",
        f"--dashboard-port={dashboard}",
        "--dashboard-host=127.0.0.1",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        "--num-cpus=2",
        f"--temp-dir={tmp}/ray",
    ]  # fmt: skip
    with open(tmp / "head.log", "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited {proc.returncode}:\n{tail(tmp / 'head.log')}")
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=5)
                break
            except OSError as e:  # refused while starting; 401 once up without a token
                if getattr(e, "code", None) == 401:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"no dashboard at {address} after 240 s:\n{tail(tmp / 'head.log')}")
            time.sleep(2)
        # The job API itself (a separate dashboard module) must answer too.
        deadline = time.monotonic() + 240
        while subprocess.run([RAY, "job", "list", "--address", address], check=False,
                             capture_output=True, env=env, timeout=120).returncode != 0:  # fmt: skip
            if time.monotonic() > deadline:
                pytest.fail(f"the job API at {address} never answered:\n{tail(tmp / 'head.log')}")
            time.sleep(5)
        yield {"address": address, "env": env, "tmp": tmp}
    finally:
        survivors = stop_session(proc.pid)
        proc.wait(timeout=30)  # reap `ray start` itself
        assert not survivors, f"head processes survived: {survivors}"
        shutil.rmtree(tmp, ignore_errors=True)


def _head_logs(head) -> str:
    """The end of the head's dashboard and job logs, for a failure message (the head's temp dir
    is deleted afterwards)."""
    logs = head["tmp"] / "ray" / "session_latest" / "logs"
    parts = []
    for name in ("dashboard.log", "dashboard_agent.log", "raylet.out"):
        if (logs / name).is_file():
            parts.append(f"--- {name}:\n{tail(logs / name, 25)}")
    return "\n".join(parts)


TRANSIENT = (  # a head that is still starting: the dashboard answers before its job agent
    "No available agent to submit job",
    "Connection aborted",
    "RemoteDisconnected",
    "Connection refused",
)


def _submit(head, job_id: str, args: list[str], timeout: float, script: str = "distill.py"):
    """`ray job submit`, tried again (under a new id) while the head is still starting up.
    Returns (completed process, the submission id that ran)."""
    runtime_env = {"env_vars": {"SEGDISTILL_CACHE": str(head["tmp"] / "cache")}}
    deadline = time.monotonic() + 300
    for attempt in range(1, 100):
        submission = f"{job_id}-{attempt}"
        command = [
            RAY, "job", "submit", "--address", head["address"], "--submission-id", submission,
            "--working-dir", str(ROOT), "--runtime-env-json", json.dumps(runtime_env),
            "--", sys.executable, f"pipelines/{script}", *args,
        ]  # fmt: skip
        out = subprocess.run(command, check=False, capture_output=True, text=True,
                             env=head["env"], timeout=timeout, cwd=ROOT)  # fmt: skip
        text = out.stdout + out.stderr
        started = f"Job '{submission}' submitted successfully" in text
        if started or not any(t in text for t in TRANSIENT) or time.monotonic() > deadline:
            return out, submission
        time.sleep(10)
    raise AssertionError("unreachable")


def _status(head, job_id: str) -> str:
    out = subprocess.run(
        [RAY, "job", "status", "--address", head["address"], job_id],
        check=False, capture_output=True, text=True, env=head["env"], timeout=120,
    )  # fmt: skip
    return out.stdout + out.stderr


def test_distill_job_writes_checkpoint_to_storage_uri(head, tiny_data, tiny_overrides):
    runs = head["tmp"] / "runs"
    args = tiny_overrides(tiny_data, f"file://{runs}", **{"method.name": "none"})
    out, job = _submit(head, "segdistill-tiny", args, timeout=1500)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-6000:] + "\n" + _head_logs(head)
    assert f"Job '{job}' succeeded" in _status(head, job)
    metas = sorted(runs.glob("distill-none-*/*/meta.json"))
    assert len(metas) == 1, list(runs.rglob("*"))
    meta = json.loads(metas[0].read_text())
    assert meta["progress"]["epoch"] == 1
    assert 0.0 <= meta["metrics"]["miou"] <= 1.0
    assert f"mIoU {100 * meta['metrics']['miou']:.2f}" in text  # the job printed the same run


def test_tune_job_runs_a_sweep_on_the_head(head, tiny_data, tiny_overrides):
    """pipelines/tune.py under `ray job submit`: the trials' drivers, their Train runs and data
    tasks fit the 2-CPU head one trial at a time, and the sweep's outputs land in storage."""
    import yaml

    storage = head["tmp"] / "sweeps"
    fixed = dict(item.split("=", 1) for item in tiny_overrides(tiny_data, str(storage)))
    sweep = {
        "overrides": {**fixed, "method.name": "none"},
        "search": {"optim.lr": "grid([0.02, 0.01])"},
        "sweep": {"name": "job-sweep", "scheduler": "fifo", "num_samples": 1},
    }
    path = head["tmp"] / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    out, job = _submit(head, "segdistill-tune", ["--config", str(path)], 1500, "tune.py")
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-6000:] + "\n" + _head_logs(head)
    assert f"Job '{job}' succeeded" in _status(head, job)
    folder = storage / "job-sweep"
    rows = (folder / "trials.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",done," in r for r in rows[1:]), rows
    assert (folder / "best.yaml").is_file() and "best config:" in text
