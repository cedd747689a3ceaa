"""The Ray side of a sweep without starting Ray: samplers, concurrency, best.yaml."""

from __future__ import annotations

import pytest
from ray import tune

from components.config import ConfigError, load_config
from components.training import sweep
from components.tuning.space import build_spec, parse_distribution


def _spec(**trainer):
    overrides = {f"trainer.{k}": v for k, v in trainer.items()}
    return build_spec({"overrides": overrides, "search": {"optim.lr": "uniform(0.01, 0.1)"}}, "t")


def test_to_tune_maps_each_distribution():
    cases = {
        "uniform(0.5, 2)": (tune.search.sample.Float, 0.5, 2),
        "loguniform(0.1, 10)": (tune.search.sample.Float, 0.1, 10),
        "randint(2, 9)": (tune.search.sample.Integer, 2, 9),
        "qrandint(4, 64, 4)": (tune.search.sample.Integer, 4, 64),
    }
    for text, (kind, low, high) in cases.items():
        domain = sweep.to_tune(parse_distribution("k", text))
        assert isinstance(domain, kind) and (domain.lower, domain.upper) == (low, high), text
    log = sweep.to_tune(parse_distribution("k", "loguniform(0.1, 10)"))
    assert isinstance(log.sampler, tune.search.sample.LogUniform)
    assert not isinstance(
        sweep.to_tune(parse_distribution("k", "uniform(0.1, 10)")).sampler,
        tune.search.sample.LogUniform,
    )
    assert sweep.to_tune(parse_distribution("k", "choice([4, 8])")).categories == [4, 8]
    assert sweep.to_tune(parse_distribution("k", "grid([1, 2])")) == {"grid_search": [1, 2]}


@pytest.mark.parametrize(
    ("cluster", "trainer", "expected"),
    [
        ({"CPU": 2.0}, {"num_workers": 1}, 1),  # one worker + one CPU for its data tasks
        ({"CPU": 16.0}, {"num_workers": 2}, 5),  # 16 // (2 + 1)
        ({"CPU": 64.0, "GPU": 8.0}, {"num_workers": 4}, 2),  # GPUs decide: 8 // 4
        ({"CPU": 64.0, "GPU": 8.0}, {"num_workers": 3}, 2),
        ({"CPU": 64.0, "GPU": 8.0}, {"num_workers": 2, "use_gpu": False}, 21),
    ],
)
def test_concurrency_follows_the_cluster(monkeypatch, cluster, trainer, expected):
    monkeypatch.setattr(sweep, "cluster_capacity", lambda: cluster)
    assert sweep.concurrency(_spec(**trainer)) == expected


def test_driver_takes_no_cpu_by_default_and_counts_when_it_does(monkeypatch):
    # The 2-CPU machine of the embedded default: worker + its data tasks fill it exactly, so
    # the driver must not ask for a CPU share (0.01 CPU left the data tasks waiting for ever).
    assert sweep.driver_resources(0) == {"CPU": 0, "node:__internal_head__": 0.001}
    assert sweep.driver_resources(0.5) == {"CPU": 0.5}
    monkeypatch.setattr(sweep, "cluster_capacity", lambda: {"CPU": 2.0})
    assert sweep.concurrency(_spec(num_workers=1)) == 1
    spec = build_spec(
        {"search": {"optim.lr": "uniform(0.01, 0.1)"}, "sweep": {"driver_cpus": 0.5}}, "t"
    )
    with pytest.raises(ConfigError, match=r"one trial needs 2.5 CPUs .* has 2"):
        sweep.concurrency(spec)


def test_trial_larger_than_cluster_named(monkeypatch):
    monkeypatch.setattr(sweep, "cluster_capacity", lambda: {"CPU": 32.0, "GPU": 4.0})
    with pytest.raises(ConfigError, match=r"one trial needs 8 GPUs .*num_workers=8.* has 4"):
        sweep.concurrency(_spec(num_workers=8))


def test_best_yaml_is_a_complete_config(tmp_path):
    spec = build_spec(
        {
            "overrides": {"trainer.epochs": 2},
            "search": {"method.weights.structural": "loguniform(0.1, 10)"},
            "sweep": {"name": "s"},
        },
        "t.yaml",
    )
    row = {
        "trial_id": "x_00001",
        "score": 0.4,
        "best_miou": 0.4,
        "epochs": 2,
        "method.weights.structural": 3.5,
    }
    path = tmp_path / "best.yaml"
    path.write_text(sweep.best_config_yaml(spec, row))
    cfg = load_config(["--config", str(path)])
    assert cfg.method.weights["structural"] == 3.5 and cfg.trainer.epochs == 2
    assert "x_00001" in path.read_text().splitlines()[0]


def test_rerun_must_be_the_same_sweep(monkeypatch, tmp_path):
    import json

    from components.tuning.space import identity

    monkeypatch.setattr(sweep, "cluster_capacity", lambda: {"CPU": 4.0})

    def make(search: str):
        raw = {
            "overrides": {"trainer.storage_path": str(tmp_path)},
            "search": {"method.weights.structural": search},
            "sweep": {"name": "s"},
        }
        return build_spec(raw, "t.yaml")

    first = make("loguniform(0.1, 10)")
    assert sweep.check_sweep(first) == 2  # no folder yet: 4 CPUs // (1 worker + 1 for data)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / sweep.IDENTITY_FILE).write_text(json.dumps(identity(first)))
    assert sweep.check_sweep(make("loguniform(0.1, 10)")) == 2  # the same sweep continues
    with pytest.raises(ConfigError, match=r"holds a different sweep \(search differ\)"):
        sweep.check_sweep(make("loguniform(0.1, 100)"))


def test_a_sweep_refuses_local_mode():
    """A trial's driver reserves no CPU for training (`sweep.driver_cpus: 0`), so a trial may
    not train in its driver: the sweep is refused before Ray starts, naming the key."""
    with pytest.raises(ConfigError, match=r"t: 'trainer\.local_mode'"):
        sweep.check_sweep(_spec(local_mode=True))
