import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import sstkd_overhead

from components.distillation import contourlet, distiller, texture


def test_overhead_benchmark_runs_and_restores_the_texture_losses(capsys):
    torch.manual_seed(0)
    sstkd_overhead.main(["--steps", "2", "--threads", "1", "--crop", "32"])
    out = capsys.readouterr().out
    assert "low map (8, 32, 8, 8)" in out
    assert "paired ratio" in out and "CDM + DTIEM only" in out
    # The stub is scoped to the `kd + adapter` arm's steps.
    assert distiller.structural_texture_loss is contourlet.structural_texture_loss
    assert distiller.statistical_texture_loss is texture.statistical_texture_loss


def test_stubbed_step_keeps_the_adapter_in_the_graph():
    a = torch.randn(2, 3, 4, 4, requires_grad=True)
    with sstkd_overhead._texture_stubbed(True):
        loss = distiller.structural_texture_loss(a, a.detach(), 2, 8)
        assert loss.item() == 0.0
    loss.backward()
    assert a.grad is not None  # zero, but the adapter's backward still runs
    assert distiller.structural_texture_loss is contourlet.structural_texture_loss
