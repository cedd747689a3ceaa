"""The driver's check that a cluster can ever run what a run asks for (no silent Ray hang)."""

from __future__ import annotations

import time

import pytest

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


def test_autoscaling_cluster_is_not_waited_on(monkeypatch):
    _fake_cluster(monkeypatch, [({"CPU": 64, "GPU": 8}, [{"CPU": 0.0}])])
    start = time.monotonic()
    wait_for_resources(_gpu(4), wait_s=30, log=lambda m: None)  # the autoscaler adds nodes
    with pytest.raises(ConfigError, match="has at most 64 CPU, 8 GPU"):
        wait_for_resources(_gpu(16), wait_s=30, log=lambda m: None)
    assert time.monotonic() - start < 25  # well under one 30 s wait: nothing was waited for


def test_capacity_of_an_autoscaling_cluster_is_its_maximum(monkeypatch):
    # A GPU cluster that has scaled to its CPU head only still counts as a GPU cluster.
    _fake_cluster(monkeypatch, [({"CPU": 200, "GPU": 16}, [{"CPU": 0.0}])])
    assert resources.cluster_capacity() == {"CPU": 200.0, "GPU": 16.0}
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
