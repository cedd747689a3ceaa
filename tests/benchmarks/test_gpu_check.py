"""benchmarks/gpu_check.py's code path on CPU (the GPU run needs a lent device)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import gpu_check


def test_cpu_smoke_runs_every_check(capsys):
    assert gpu_check.main(["--cpu-smoke"]) == 0
    out = capsys.readouterr().out.splitlines()
    checks = {ln.split(":")[0] for ln in out if ln.startswith("check ")}
    assert checks == {
        "check bf16 autocast", "check channels-last", "check nccl", "check throughput",
    }  # fmt: skip
    assert any("TFLOP/s achieved" in ln for ln in out)
    assert out[-1] == "gpu_check: ok"


def test_peaks_from_the_device_name_or_the_flag():
    assert gpu_check._peak("NVIDIA H200", None) == 989.0
    assert gpu_check._peak("NVIDIA A100-SXM4-80GB", None) == 312.0
    assert gpu_check._peak("Some GPU", None) is None
    assert gpu_check._peak("NVIDIA H200", 500.0) == 500.0


def test_without_a_gpu_it_says_so(capsys):
    import torch

    if torch.cuda.is_available():
        return
    assert gpu_check.main([]) == 2
    assert "no GPU here" in capsys.readouterr().out
