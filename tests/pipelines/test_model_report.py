"""pipelines/report.py and components/model_report.py: FLOPs against hand-computed values, the
report of a tiny teacher/student pair (parameter counts, ratios, both files), mIoU measured on a
dataset."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from components import model_report
from components.config import ModelConfig
from components.models.build import build_model
from components.training.checkpoint import save_checkpoint
from pipelines import report


def test_flops_of_one_conv_layer_are_the_hand_computed_value():
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    x = torch.randn(1, 3, 10, 12)
    # Output 1 x 8 x 10 x 12 = 960 values, each a sum over 3 input channels x 3 x 3 taps = 27
    # multiply-adds: 960 x 27 = 25,920 MACs. FlopCounterMode counts a multiply-add as 2 FLOPs
    # and ignores the bias: 2 x 25,920 = 51,840.
    assert model_report.flop_count(conv, x) == 2 * 960 * 27 == 51_840

    grouped = nn.Conv2d(8, 8, kernel_size=3, stride=2, padding=1, groups=4, bias=False)
    x = torch.randn(2, 8, 10, 12)
    # Output 2 x 8 x 5 x 6 = 480 values, each over 8 / 4 = 2 input channels x 9 taps = 18
    # multiply-adds: 480 x 18 = 8,640 MACs = 17,280 FLOPs.
    assert model_report.flop_count(grouped, x) == 2 * 480 * 18 == 17_280


def test_latency_summary_is_the_median_and_p90():
    stats = model_report.summary_ms([i / 1000 for i in range(1, 11)])  # 1..10 ms
    assert stats["median_ms"] == pytest.approx(5.5)
    assert stats["p90_ms"] == pytest.approx(9.1)  # linear interpolation: 9 + 0.1 x (10 - 9)
    assert stats["runs"] == 10


def _checkpoint(folder, width: float, miou: float, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(width=width)
    model = build_model(cfg, 4)
    meta = {
        "model": dataclasses.asdict(cfg),
        "num_classes": 4,
        "class_names": ["background", "a", "b", "c"],
        "ignore_index": 255,
        "metrics": {"miou": miou, "pixel_acc": 0.9},
        "progress": {"iteration": 5},
    }
    save_checkpoint(folder, model.state_dict(), None, meta)
    return model


def test_report_of_a_teacher_student_pair(tmp_path, capsys):
    teacher = _checkpoint(tmp_path / "teacher" / "epoch_0002", 0.25, 0.50, 0)
    student = _checkpoint(tmp_path / "student" / "epoch_0002", 0.125, 0.40, 1)
    argv = ["--student", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher")]
    argv += ["--height", "64", "--width", "64", "--runs", "3", "--warmup", "1", "--batch", "2"]
    argv += ["--exporter", "legacy"]  # fast; the dynamo exporter is covered by tests/test_export
    assert report.main(argv) == 0
    out = capsys.readouterr().out

    # Written to the student's run folder.
    md = tmp_path / "student" / "model_report.md"
    data = json.loads((tmp_path / "student" / "model_report.json").read_text())
    assert md.read_text() in out
    t, s = data["models"]["teacher"], data["models"]["student"]
    assert t["parameters"] == sum(p.numel() for p in teacher.parameters())
    assert s["parameters"] == sum(p.numel() for p in student.parameters())
    assert t["model"] == "deeplabv3-resnet18 x0.25" and s["model"] == "deeplabv3-resnet18 x0.125"
    assert data["ratio"]["parameters (M)"] == pytest.approx(s["parameters"] / t["parameters"])
    assert 0 < s["flops"] < t["flops"] and s["macs"] == s["flops"] // 2
    assert (t["miou_meta"], s["miou_meta"]) == (0.50, 0.40)
    assert data["ratio"]["mIoU % (meta.json)"] == pytest.approx(0.8)
    for row in (t, s):
        lat = row["cpu"]["latency"]
        assert 0 < lat["median_ms"] <= lat["p90_ms"] and lat["runs"] == 3
        assert row["cpu"]["throughput"]["batch"] == 2
        assert row["cpu"]["throughput"]["images_per_s"] > 0
        assert row["onnxruntime"]["latency"]["median_ms"] > 0  # onnxruntime is a dev dependency
        assert row["onnxruntime"]["exporter"] == "legacy"
        assert row["cpu_memory"]["forward_mb"] >= 0 and row["cpu_memory"]["peak_rss_mb"] > 0
        assert "gpu" in row if torch.cuda.is_available() else "gpu" not in row
    assert "| parameters (M) | 1.04 | 0.26 | 0.252 |" in out
    assert "| mIoU % (meta.json) | 50.00 | 40.00 | 0.800 |" in out
    assert "2 FLOPs per multiply-add" in out


def test_student_alone_with_mious_measured_on_a_dataset(tmp_path, tiny_data, capsys):
    from components.data.decode import decode_split
    from components.data.shards import DatasetInfo
    from components.metrics import miou
    from components.training.evaluation import evaluate_counts

    student = _checkpoint(tmp_path / "run" / "epoch_0001", 0.125, 0.25, 2)
    argv = ["--student", str(tmp_path / "run" / "epoch_0001"), "--out", str(tmp_path / "rep")]
    argv += ["--height", "32", "--width", "32", "--runs", "1", "--warmup", "0", "--batch", "1"]
    argv += ["--data", tiny_data, "--eval-batch", "5", "--no-onnx", "--no-memory"]
    assert report.main(argv) == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "rep" / "model_report.json").read_text())
    assert "ratio" not in data and "student / teacher" not in out and "| teacher" not in out
    row = data["models"]["student"]
    assert row["onnxruntime"] == {"skipped": "not asked for"}

    info = DatasetInfo.load(tiny_data)
    columns = decode_split(tiny_data, info, "val")
    batch = {
        "image": torch.from_numpy(np.asarray(columns["image"])).float(),
        "mask": torch.from_numpy(np.asarray(columns["mask"])).long(),
        "valid": torch.from_numpy(np.asarray(columns["valid"])).bool(),
    }
    expected, _ = miou(evaluate_counts(student.eval(), [batch], 4, info.ignore_index).confusion)
    assert row["miou_measured"]["miou"] == pytest.approx(expected)
    assert row["miou_measured"]["images"] == 16
    assert f"| mIoU % (measured) | {100 * expected:.2f} |" in out


def test_a_dataset_of_other_classes_fails_naming_both(tmp_path, tiny_data, capsys):
    torch.manual_seed(0)
    cfg = ModelConfig(width=0.125)
    meta = {"model": dataclasses.asdict(cfg), "num_classes": 3, "progress": {"iteration": 1}}
    save_checkpoint(tmp_path / "c", build_model(cfg, 3).state_dict(), None, meta)
    argv = ["--student", str(tmp_path / "c"), "--height", "32", "--width", "32", "--runs", "1"]
    argv += ["--data", tiny_data, "--no-onnx", "--no-memory"]
    assert report.main(argv) == 2
    assert "predicts 3 classes" in capsys.readouterr().err
