import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import sstkd_overhead

from components.distillation.terms import TERMS


def test_overhead_benchmark_runs_and_leaves_the_term_table_alone(capsys):
    before = dict(TERMS)
    torch.manual_seed(0)
    sstkd_overhead.main(["--steps", "2", "--threads", "1", "--crop", "32"])
    out = capsys.readouterr().out
    assert "low map (8, 32, 8, 8)" in out
    assert "paired ratio" in out and "CDM + DTIEM only" in out
    assert TERMS == before  # the stub is the `kd + adapter` arm's own


def test_stubbed_method_keeps_the_adapter_in_the_graph():
    from components.config import merge_config
    from components.distillation.build import build_method
    from components.models.build import build_model

    cfg = merge_config(None, ["method.weights.adversarial=0"])
    student = build_model(cfg.model, 4)
    method = build_method(cfg, student, build_model(cfg.teacher.model, 4), num_classes=4)
    sstkd_overhead.stub_texture(method)
    batch = {"image": torch.randn(2, 3, 32, 32), "mask": torch.randint(0, 4, (2, 32, 32))}
    terms = method.training_step(batch)
    assert float(terms["structural"].detach()) == 0.0 == float(terms["statistical"].detach())
    terms["loss"].backward()
    adapter = method.trainable.adapters["low"]
    assert all(p.grad is not None for p in adapter.parameters())  # its backward still runs
    assert TERMS["structural"] is not sstkd_overhead.ZERO_LOW
