"""The sweep file: distributions, search keys and settings are checked before any trial starts."""

from __future__ import annotations

import pytest

from components.config import ConfigError
from components.tuning.space import (
    DEFAULT_SWEEP,
    Distribution,
    build_spec,
    load_sweep,
    parse_distribution,
)


def spec_of(search: dict, overrides: dict | None = None, sweep: dict | None = None, cli=None):
    raw = {"overrides": overrides or {}, "search": search, "sweep": sweep or {}}
    return build_spec(raw, "t.yaml", cli)


@pytest.mark.parametrize(
    ("text", "name", "args"),
    [
        ("loguniform(0.1, 10)", "loguniform", (0.1, 10)),
        ("uniform(0, 1.5)", "uniform", (0, 1.5)),
        (" quniform(0, 1, 0.25) ", "quniform", (0, 1, 0.25)),
        ("randint(2, 9)", "randint", (2, 9)),
        ("qrandint(4, 64, 4)", "qrandint", (4, 64, 4)),
        ("choice([4, 8, 16])", "choice", ([4, 8, 16],)),
        ("choice(['a', 'b'])", "choice", (["a", "b"],)),
        ("grid([0.1, 1e-2])", "grid", ([0.1, 0.01],)),
    ],
)
def test_parse_distribution(text, name, args):
    assert parse_distribution("k", text) == Distribution(name, args)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("lognormal(0, 1)", "unknown distribution 'lognormal'"),
        ("loguniform(0.1)", "loguniform takes 2 argument(s)"),
        ("loguniform(0, 10)", "needs low > 0"),
        ("uniform(2, 1)", "needs low < high"),
        ("quniform(0, 1, 0)", "needs q > 0"),
        ("quniform(0.1, 1, 0.25)", "multiples of q"),
        ("randint(1.5, 4)", "randint takes integers"),
        ("choice([])", "non-empty list"),
        ("choice(4)", "non-empty list"),
        ("uniform(a, 1)", "must be literal values"),
        ("uniform(low=0, high=1)", "not of the form name(arguments)"),
        ("0.5", "not of the form name(arguments)"),
        ("loguniform(0.1,", "cannot parse"),
        (3.0, "a fixed value goes under 'overrides:'"),
    ],
)
def test_bad_distribution_named(text, needle):
    with pytest.raises(ConfigError, match=r"search 'method\.weights\.structural'") as e:
        parse_distribution("method.weights.structural", text)
    assert needle in str(e.value)


def test_edge_values_span_the_distribution():
    assert parse_distribution("k", "loguniform(0.1, 10)").edge_values() == [0.1, 10.0]
    assert parse_distribution("k", "randint(2, 9)").edge_values() == [2, 8]  # high exclusive
    assert parse_distribution("k", "qrandint(3, 65, 4)").edge_values() == [4, 64]
    assert parse_distribution("k", "quniform(0.25, 1, 0.25)").edge_values() == [0.25, 1.0]
    assert parse_distribution("k", "qrandint(2, 8, 1)").edge_values() == [2, 7]  # like randint
    assert parse_distribution("k", "choice([4, 8])").edge_values() == [4, 8]


def test_spec_validates_and_builds_trial_configs():
    spec = spec_of(
        {
            "method.weights.structural": "loguniform(0.1, 10)",
            "method.dtiem.levels": "choice([4, 8, 16])",
            "method.dtiem.iterations": "choice([1, 2, 3, 5])",
        },
        overrides={"trainer.epochs": 2, "model.width": 0.125},
        cli=["sweep.num_samples=7", "optim.lr=0.05"],
    )
    assert spec.base.trainer.epochs == 2 and spec.base.model.width == 0.125
    assert spec.base.optim.lr == 0.05  # a distill override on the command line
    assert spec.settings.num_samples == 7 and spec.settings.scheduler == "asha"
    cfg = spec.trial_config({"method.weights.structural": 2.5, "method.dtiem.levels": 8})
    assert cfg.method.weights["structural"] == 2.5 and cfg.method.dtiem.levels == 8
    assert cfg.trainer.epochs == 2  # the base is kept
    assert spec.base.method.dtiem.levels == 16  # and not modified


def test_a_mapping_or_list_under_overrides_sets_a_section():
    """A nested mapping (configs/tune_relation_synthetic.yaml's `data.synthetic`) and a list;
    the mapping used to reach OmegaConf as block YAML on one dotlist line: a raw ScannerError."""
    synthetic = {"num_train": 512, "num_unlabeled": 0, "num_val": 64}
    spec = spec_of(
        {"optim.lr": "loguniform(0.01, 0.1)"},
        overrides={"data.synthetic": synthetic, "eval.scales": [0.75, 1.0]},
    )
    s = spec.base.data.synthetic
    assert (s.num_train, s.num_unlabeled, s.num_val, s.size) == (512, 0, 64, 48)
    assert spec.base.eval.scales == [0.75, 1.0]


@pytest.mark.parametrize(
    ("search", "overrides", "needle"),
    [
        (
            {"method.weights.structurl": "uniform(0, 1)"},
            {},
            "did you mean 'method.weights.structural'",
        ),
        ({"method.dtiem": "choice([4])"}, {}, "is a section"),
        ({"method.dtiem.levels": "choice([1, 4, 8])"}, {}, "can give 1"),
        ({"method.dtiem.levels": "randint(1, 8)"}, {}, "'method.dtiem.levels': must be >= 2"),
        ({"method.dtiem.levels": "loguniform(4, 128)"}, {}, "integer key"),
        ({"optim.lr": "uniform(-1, 1)"}, {}, "'optim.lr': must be > 0"),
        ({"method.cdm.directions": "choice([4, 6])"}, {}, "power of 2"),
        (
            {"method.weights.structural": "uniform(0, 1)"},
            {"method.weights.structural": 1.0},
            "both searched",
        ),
        ({"method.name": "choice(['kd', 'nope'])"}, {}, "'nope' not one of"),
        ({"trainer.epochs": "choice([1, 2])"}, {}, "cannot be searched"),
        ({"data.root": "choice(['a', 'b'])"}, {}, "cannot be searched"),
    ],
)
def test_bad_search_rejected_naming_the_key(search, overrides, needle):
    key = next(iter(search))
    with pytest.raises(ConfigError) as e:
        spec_of(search, overrides)
    assert key in str(e.value) and needle in str(e.value), str(e.value)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"search": {}}, "at least one dotted key"),
        ({"search": {"optim.lr": "uniform(0.01, 0.1)"}, "sweeps": {}}, "unknown top-level"),
        (
            {"search": {"optim.lr": "uniform(0.01, 0.1)"}, "sweep": {"scheduler": "pbt"}},
            "scheduler",
        ),
        ({"search": {"optim.lr": "uniform(0.01, 0.1)"}, "sweep": {"num_sample": 2}}, "num_sample"),
        ({"search": {"optim.lr": "uniform(0.01, 0.1)"}, "sweep": {"grace_period": 0}}, "grace"),
        ({"search": {"optim.lr": "uniform(0.01, 0.1)"}, "sweep": {"metric": "mIoU"}}, "'miou'"),
        ({"search": {"optim.lr": "uniform(0.01, 0.1)"}, "sweep": {"driver_cpus": -1}}, "[0, 1]"),
        (
            {"search": {"optim.lr": "uniform(0.01, 0.1)"}, "overrides": {"optim.lrr": 1}},
            "optim.lrr",
        ),
        # A name that is not one folder would put the sweep outside its storage (issue 26).
        ({"search": {"optim.lr": "uniform(0.01, 0.1)"}, "sweep": {"name": ".."}}, "sweep.name"),
        ({"search": {"optim.lr": "uniform(0.01, 0.1)"}, "sweep": {"name": "a/b"}}, "sweep.name"),
    ],
)
def test_bad_sweep_file_rejected(raw, needle):
    with pytest.raises(ConfigError, match="t.yaml|command line") as e:
        build_spec(raw, "t.yaml")
    assert needle in str(e.value), str(e.value)


def test_sweep_file_on_disk_with_relative_distill_path(tmp_path):
    (tmp_path / "base.yaml").write_text("method:\n  name: sstkd\ntrainer:\n  epochs: 3\n")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "distill: base.yaml\n"
        "overrides:\n  optim.lr: 0.01\n"
        "search:\n  method.weights.statistical: loguniform(0.1, 10)\n"
        "sweep:\n  num_samples: 2\n  scheduler: fifo\n"
    )
    spec = load_sweep(str(sweep))
    assert spec.settings.name == "sweep"  # the file's name when sweep.name is not set
    assert spec.base.trainer.epochs == 3 and spec.base.optim.lr == 0.01
    assert spec.settings.scheduler == "fifo" and spec.search["method.weights.statistical"].log_scale
    with pytest.raises(ConfigError, match="sweep file not found"):
        load_sweep(str(tmp_path / "missing.yaml"))


def test_local_paths_become_absolute_uris_stay(tmp_path, monkeypatch):
    # Tune runs each trial in a working directory of its own: a relative data.root would miss.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "teacher.pth").write_bytes(b"")
    spec = spec_of(
        {"optim.lr": "loguniform(0.001, 0.1)"},
        {"data.root": "data/synthetic", "teacher.checkpoint": "teacher.pth"},
    )
    assert spec.base.data.root == str(tmp_path / "data" / "synthetic")
    assert spec.base.teacher.checkpoint == str(tmp_path / "teacher.pth")
    assert spec.trial_config({"optim.lr": 0.01}).data.root == spec.base.data.root
    spec = spec_of({"optim.lr": "loguniform(0.001, 0.1)"}, {"data.root": "s3://bucket/shards"})
    assert spec.base.data.root == "s3://bucket/shards" and spec.base.model.pretrained is None


def test_embedded_default_and_shipped_sweeps_validate():
    spec = load_sweep(None)
    assert set(spec.search) == set(DEFAULT_SWEEP["search"])
    # distill's default: the stage's word survives the paths made absolute (it is not a file)
    assert spec.base.model.pretrained == spec.base.teacher.model.pretrained == "synthetic"
    # The Cityscapes protocol names an ImageNet ResNet file that is not in the repository.
    for path, cli in (
        ("configs/tune_sstkd_synthetic.yaml", []),
        ("configs/tune_sstkd_cityscapes.yaml", ["model.pretrained=null"]),
    ):
        spec = load_sweep(path, cli)
        assert "method.weights.structural" in spec.search and "method.dtiem.levels" in spec.search


def test_identity_ignores_the_filled_in_teacher_but_not_the_space():
    import dataclasses

    from components.tuning.space import identity

    spec = spec_of({"method.weights.structural": "loguniform(0.1, 10)"})
    before = identity(spec)
    spec.base = dataclasses.replace(
        spec.base, teacher=dataclasses.replace(spec.base.teacher, checkpoint="outputs/teacher-x")
    )
    assert identity(spec) == before  # tune.py sets the trained teacher after the first check
    other = spec_of({"method.weights.structural": "loguniform(0.1, 100)"})
    assert identity(other)["search"] != before["search"]
    assert (
        identity(spec_of({"method.weights.structural": "loguniform(0.1, 10)"}, {"optim.lr": 0.05}))[
            "base"
        ]
        != before["base"]
    )
