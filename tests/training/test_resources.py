"""The driver's check that a cluster can ever run what a run asks for (no silent Ray hang)."""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path

import pytest
import yaml

from components.config import ConfigError, TrainerConfig
from components.training import resources
from components.training.resources import (
    Request,
    max_shortfall,
    run_request,
    shortfall,
    wait_for_resources,
)


def _gpu(workers: int, cpus: float = 1.0) -> Request:
    return run_request(TrainerConfig(num_workers=workers, cpus_per_worker=cpus), True)


def test_request_from_config():
    r = run_request(TrainerConfig(num_workers=3, cpus_per_worker=2), cluster_has_gpu=True)
    assert r.per_worker == {"CPU": 2.0, "GPU": 1.0} and r.totals == {"CPU": 6.0, "GPU": 3.0}
    cpu = run_request(TrainerConfig(num_workers=2, cpus_per_worker=1), cluster_has_gpu=False)
    assert cpu.per_worker == {"CPU": 1.0}
    assert cpu.totals == {"CPU": 3.0}  # one more CPU for Ray Data's decode tasks
    forced = run_request(TrainerConfig(use_gpu=False), cluster_has_gpu=True)
    assert not forced.use_gpu


def test_fits_and_totals_short():
    nodes = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
    assert shortfall(_gpu(2), nodes) is None
    message = shortfall(_gpu(4), nodes)
    assert message == (
        "the run needs 4 CPU, 4 GPU (trainer.num_workers=4 x (1 CPU, 1 GPU)) "
        "but the cluster has 16 CPU, 2 GPU"
    )


def test_cpu_run_needs_a_cpu_for_data():
    cpu2 = run_request(TrainerConfig(num_workers=2), cluster_has_gpu=False)
    message = shortfall(cpu2, [{"CPU": 2.0}])
    assert "needs 3 CPU" in message and "+ 1 CPU for Ray Data" in message
    assert shortfall(cpu2, [{"CPU": 3.0}]) is None


def test_worker_cannot_span_nodes():
    # Totals suffice (9 CPU, 2 GPU for 2 CPU + 2 GPU) but the GPU node has one free CPU.
    nodes = [{"CPU": 8.0}, {"CPU": 1.0, "GPU": 2.0}]
    message = shortfall(_gpu(2), nodes)
    assert message.startswith("only 1 of trainer.num_workers=2 workers of (1 CPU, 1 GPU) fit")
    assert "(8 CPU, 0 GPU; 1 CPU, 2 GPU)" in message


def test_autoscaling_maximum():
    assert max_shortfall(_gpu(8), {"CPU": 100, "GPU": 8}) is None
    message = max_shortfall(_gpu(8), {"CPU": 100, "GPU": 4})
    assert "needs 8 CPU, 8 GPU" in message and "has at most 100 CPU, 4 GPU" in message


def _fake_cluster(monkeypatch, states):
    """Each poll returns the next (maximum, nodes); the last one repeats."""
    calls = []
    monkeypatch.setattr(resources, "started_here", lambda: False)  # a cluster, not our own

    def state():
        calls.append(time.monotonic())
        return states[min(len(calls), len(states)) - 1]

    monkeypatch.setattr(resources, "_cluster_state", state)
    return calls


def test_fixed_cluster_fails_after_the_wait(monkeypatch):
    calls = _fake_cluster(monkeypatch, [(None, [{"CPU": 2.0}])])
    logged = []
    start = time.monotonic()
    with pytest.raises(ConfigError) as e:
        wait_for_resources(_gpu(1), wait_s=0.5, log=logged.append, poll_s=0.1)
    assert 0.5 <= time.monotonic() - start < 60  # gave up on its own (loose: CI machines stall)
    assert "needs 1 CPU, 1 GPU" in str(e.value) and "has 2 CPU, 0 GPU" in str(e.value)
    assert "waited 0.5 s" in str(e.value)
    assert len(logged) == 1 and len(calls) >= 2  # polled again before giving up


def test_fixed_cluster_that_grows_is_waited_for(monkeypatch):
    small, big = [{"CPU": 2.0}], [{"CPU": 2.0}, {"CPU": 8.0, "GPU": 1.0}]
    calls = _fake_cluster(monkeypatch, [(None, small), (None, small), (None, big)])
    wait_for_resources(_gpu(1), wait_s=30, log=lambda m: None, poll_s=0.01)
    assert len(calls) == 3


AWS = yaml.safe_load((Path(__file__).resolve().parents[2] / "clusters/aws-gpu.yaml").read_text())
HEAD = {"CPU": 0.0, "memory": 1e9, "node:__internal_head__": 1.0}


def _aws(**res) -> resources.Autoscaler:
    """clusters/aws-gpu.yaml's node types, each given `resources[type]` (what `ray up` fills in
    from the instance types before writing the head's ~/ray_bootstrap_config.yaml)."""
    config = copy.deepcopy(AWS)
    for name, given in res.items():
        config["available_node_types"][name.replace("_", ".")]["resources"] = given
    scaler = resources.autoscaler_from_config(config, "aws-gpu.yaml")
    assert scaler is not None
    return scaler


def test_node_types_and_maximum_from_the_aws_config():
    scaler = _aws(
        gpu_1x_spot={"CPU": 8, "GPU": 1},
        gpu_4x_spot={"CPU": 48, "GPU": 4},
        gpu_1x_ondemand={"CPU": 8, "GPU": 1},
        cpu_data={"CPU": 16},
    )
    assert [t.name for t in scaler.node_types] == [
        "gpu.1x.spot", "gpu.4x.spot", "gpu.1x.ondemand", "cpu.data"
    ]  # fmt: skip
    assert [t.max_workers for t in scaler.node_types] == [8, 2, 4, 4] and scaler.max_workers == 12
    top = resources.maximum_of(scaler, [HEAD])
    # GPU: 2 x 4 + 8 x 1 + 2 of the 4 on-demand (12 workers at most) = 18
    assert top["GPU"] == 18.0
    # CPU: 2 x 48 + 4 x 16 + 6 x 8 (the largest first, 12 workers) = 208
    assert top["CPU"] == 208.0 and top["node:__internal_head__"] == 1.0


def test_a_config_without_worker_types_is_a_fixed_cluster():
    config = {"head_node_type": "h", "available_node_types": {"h": {"resources": {}}}}
    assert resources.autoscaler_from_config(config) is None


def test_node_types_from_rays_cluster_config_proto():
    from ray.core.generated import autoscaler_pb2

    proto = autoscaler_pb2.ClusterConfig()
    group = proto.node_group_configs.add()
    group.name, group.max_count = "gpu", 3
    group.resources.update({"CPU": 8, "GPU": 1})
    scaler = resources.autoscaler_from_cluster_config(proto, "GCS")
    assert scaler.node_types == (resources.NodeType("gpu", {"CPU": 8.0, "GPU": 1.0}, 3),)
    assert resources.maximum_of(scaler, [HEAD])["GPU"] == 3.0
    assert resources.autoscaler_from_cluster_config(None) is None


def test_monitor_config_path_from_the_process_table(tmp_path):
    """The autoscaler process (`ray start --head --autoscaling-config=...`) names its config; a
    read-only monitor (a hand-started head) has none; another cluster's monitor is skipped."""
    monitor = "/x/ray/autoscaler/_private/monitor.py"

    def proc(pid, *args):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes("\0".join(args).encode() + b"\0")

    proc(10, "python", monitor, "--gcs-address=10.0.0.1:7000", "--autoscaling-config=/o.yaml")
    assert resources._monitor_config_path("10.0.0.1:6379", str(tmp_path)) is None
    proc(11, "python", monitor, "--gcs-address=10.0.0.1:6379", "--autoscaling-config=/c.yaml")
    assert resources._monitor_config_path("10.0.0.1:6379", str(tmp_path)) == "/c.yaml"
    shutil.rmtree(tmp_path / "11")
    proc(12, "python", monitor, "--gcs-address=10.0.0.1:6379")
    assert resources._monitor_config_path("10.0.0.1:6379", str(tmp_path)) is None


def test_ray_260_publishes_no_cluster_config(ray_session):
    """Why the monitor's config is read: nothing in Ray 2.60 writes the GCS cluster config."""
    from ray._private import state

    assert state.state.get_max_resources_from_cluster_config() is None
    assert resources.find_autoscaler() is None  # the session's private instance: fixed


def test_autoscaling_cluster_is_not_waited_on_when_it_can_never_fit(monkeypatch):
    scaler = _aws(gpu_1x_spot={"CPU": 8, "GPU": 1}, gpu_1x_ondemand={"CPU": 8, "GPU": 1})
    _fake_cluster(monkeypatch, [(scaler, [HEAD])])
    monkeypatch.setattr(resources, "_place_demand", lambda b: pytest.fail("no demand"))
    start = time.monotonic()
    with pytest.raises(ConfigError, match="has at most 96 CPU, 12 GPU"):
        wait_for_resources(_gpu(16), wait_s=30, log=lambda m: None)
    assert time.monotonic() - start < 25  # nothing was waited for


def test_a_worker_no_node_type_can_hold_fails_at_once(monkeypatch):
    scaler = _aws(gpu_1x_spot={"CPU": 8, "GPU": 1}, gpu_1x_ondemand={"CPU": 8, "GPU": 1})
    _fake_cluster(monkeypatch, [(scaler, [HEAD])])
    two_gpus = Request(2, {"CPU": 1.0, "GPU": 2.0}, True)
    with pytest.raises(ConfigError) as e:
        wait_for_resources(two_gpus, wait_s=30, log=lambda m: None)
    assert "no node type of the autoscaling cluster can hold one worker of (1 CPU, 2 GPU)" in str(
        e.value
    )
    assert "gpu.1x.spot (8 CPU, 1 GPU, max 8)" in str(e.value)


def test_cold_autoscaling_cluster_places_demand_and_waits(monkeypatch):
    scaler = _aws(cpu_data={"CPU": 1})  # only cpu.data can hold CPU work
    grown = [HEAD, {"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}]
    _fake_cluster(monkeypatch, [(scaler, [HEAD]), (scaler, [HEAD]), (scaler, grown)])
    placed, logged = [], []
    monkeypatch.setattr(resources, "_place_demand", placed.append)
    monkeypatch.setattr(resources, "_clear_later", lambda r: placed.append("clear later"))
    cpu2 = run_request(TrainerConfig(num_workers=2), cluster_has_gpu=False)
    wait_for_resources(cpu2, wait_s=0, log=logged.append, poll_s=0.01)
    assert "for the autoscaler to start 3 nodes of type cpu.data" in logged[0]
    assert placed[0] == [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}] and placed[-1] == "clear later"


def test_autoscaler_that_never_starts_the_nodes_times_out_and_clears(monkeypatch):
    scaler = _aws(cpu_data={"CPU": 1})
    _fake_cluster(monkeypatch, [(scaler, [HEAD])])
    placed = []
    monkeypatch.setattr(resources, "_place_demand", placed.append)
    cpu2 = run_request(TrainerConfig(num_workers=2), cluster_has_gpu=False)
    with pytest.raises(ConfigError, match=r"waited 0.2 s for the autoscaler to start 3 nodes"):
        wait_for_resources(cpu2, 0, log=lambda m: None, poll_s=0.05, autoscale_wait_s=0.2)
    assert placed[-1] == []  # the demand is withdrawn


def test_capacity_of_an_autoscaling_cluster_is_its_maximum(monkeypatch):
    # A GPU cluster that has scaled to its CPU head only still counts as a GPU cluster.
    scaler = _aws(gpu_1x_spot={"CPU": 8, "GPU": 1}, gpu_1x_ondemand={"CPU": 8, "GPU": 1})
    _fake_cluster(monkeypatch, [(scaler, [HEAD])])
    capacity = resources.cluster_capacity()
    assert capacity["GPU"] == 12.0 and capacity["CPU"] == 96.0
    _fake_cluster(monkeypatch, [(None, [{"CPU": 2.0}, {"CPU": 8.0, "GPU": 1.0}])])
    assert resources.cluster_capacity() == {"CPU": 10.0, "GPU": 1.0}


def test_a_private_local_instance_fails_at_once(monkeypatch):
    """This machine's own instance (started by this process) cannot grow: no 60 s wait."""
    _fake_cluster(monkeypatch, [(None, [{"CPU": 2.0}])])
    monkeypatch.setattr(resources, "started_here", lambda: True)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"has 2 CPU, 0 GPU \(this machine's own Ray"):
        wait_for_resources(_gpu(1), wait_s=60, log=lambda m: None)
    assert time.monotonic() - start < 30


def test_two_cpu_workers_share_a_two_core_laptop():
    t = TrainerConfig(num_workers=2, cpus_per_worker=1)
    r = run_request(t, cluster_has_gpu=False, local_cpus=2.0)
    assert r.per_worker == {"CPU": 0.5} and r.totals == {"CPU": 2.0}  # + 1 for Ray Data
    assert shortfall(r, [{"CPU": 2.0}]) is None
    fits = run_request(TrainerConfig(num_workers=1), cluster_has_gpu=False, local_cpus=4.0)
    assert fits.per_worker == {"CPU": 1.0}  # it fits: the asked-for CPUs
    too_many = run_request(TrainerConfig(num_workers=8), cluster_has_gpu=False, local_cpus=2.0)
    assert too_many.per_worker == {"CPU": 1.0}  # a share under 0.25 CPU: refused, not shrunk
    on_cluster = run_request(t, cluster_has_gpu=False)  # a cluster's nodes: as configured
    assert on_cluster.per_worker == {"CPU": 1.0}


KUBERAY_HEAD_ENV = {
    "RAY_CLUSTER_NAME": "segdistill",
    "RAY_CLUSTER_NAMESPACE": "ml",
    # what KubeRay generates for the head of an autoscaling RayCluster (rayStartParams plus
    # its own no-monitor: the autoscaler runs in the pod's sidecar container)
    "KUBERAY_GEN_RAY_START_CMD": "ray start --head --block --dashboard-host=0.0.0.0 "
    "--no-monitor --num-cpus=0",
}


def _shipped_raycluster() -> dict:
    path = Path(__file__).resolve().parents[2] / "clusters/kuberay/raycluster.yaml"
    cr = next(d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "RayCluster")
    cr["metadata"]["namespace"] = "ml"  # the API server fills it in
    return cr


def test_a_kuberay_pod_of_an_autoscaling_cluster_is_recognised():
    assert resources.kuberay_autoscaling({}) is None  # not on Kubernetes
    fixed = dict(KUBERAY_HEAD_ENV, KUBERAY_GEN_RAY_START_CMD="ray start --head --block")
    assert resources.kuberay_autoscaling(fixed) is None  # KubeRay without in-tree autoscaling
    assert resources.kuberay_autoscaling(KUBERAY_HEAD_ENV) == ("ml", "segdistill")
    v2 = dict(fixed, RAY_enable_autoscaler_v2="true")  # set by KubeRay when autoscaling
    assert resources.kuberay_autoscaling(v2) == ("ml", "segdistill")


def test_kuberay_node_types_from_the_shipped_raycluster():
    """The worker groups as the sidecar sees them, through Ray's own KubeRay translation."""
    asked = []

    def read(namespace, name):
        asked.append((namespace, name))
        return _shipped_raycluster()

    scaler = resources.kuberay_autoscaler(KUBERAY_HEAD_ENV, read)
    assert asked == [("ml", "segdistill")] and scaler.known
    types = {t.name: t for t in scaler.node_types}
    assert types["gpu-1x"].resources["GPU"] == 1.0 and types["gpu-1x"].max_workers == 8
    assert types["gpu-4x"].resources["GPU"] == 4.0 and types["gpu-4x"].max_workers == 2
    assert "GPU" not in types["cpu-data"].resources
    assert resources.maximum_of(scaler, [HEAD])["GPU"] == 16.0  # 8 x 1 + 2 x 4
    assert resources.kuberay_autoscaler({}, read) is None


def test_an_unreadable_raycluster_still_places_demand_without_limits(monkeypatch):
    """The pod's service account may not read its RayCluster: the cluster still autoscales,
    so the run's demand is placed and waited for (no limit can be checked up front)."""

    def forbidden(namespace, name):
        raise PermissionError("403")

    scaler = resources.kuberay_autoscaler(KUBERAY_HEAD_ENV, forbidden)
    assert scaler is not None and not scaler.known and "PermissionError" in scaler.source
    grown = [HEAD, {"CPU": 8.0, "GPU": 1.0}]
    _fake_cluster(monkeypatch, [(scaler, [HEAD]), (scaler, grown)])
    placed, logged = [], []
    monkeypatch.setattr(resources, "_place_demand", placed.append)
    monkeypatch.setattr(resources, "_clear_later", lambda r: placed.append("clear later"))
    wait_for_resources(_gpu(1), wait_s=0, log=logged.append, poll_s=0.01)
    assert "for the autoscaler to start nodes" in logged[0]
    assert placed == [[{"CPU": 1.0, "GPU": 1.0}], "clear later"]
    capacity = resources.cluster_capacity()  # no maximum known: what it has now
    assert capacity["CPU"] == 8.0 and capacity["GPU"] == 1.0


def test_the_raycluster_is_read_at_most_once_a_minute(monkeypatch):
    """Runs poll the cluster every 2 s while they wait; the API server is asked once a minute."""
    reads = []
    for key, value in KUBERAY_HEAD_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(resources, "_kuberay_read", {})
    monkeypatch.setattr(resources, "kuberay_autoscaler", lambda: reads.append(1) or "scaler")
    assert resources._kuberay_autoscaler_cached() == "scaler"
    assert resources._kuberay_autoscaler_cached() == "scaler" and len(reads) == 1
    monkeypatch.setattr(resources, "KUBERAY_READ_EVERY_S", 0.0)
    resources._kuberay_autoscaler_cached()
    assert len(reads) == 2
