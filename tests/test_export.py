"""pipelines/export.py and components/export.py: TorchScript and ONNX files that match the eager
model at the export size and at other sizes and batch sizes, the tolerance check, preprocess.json
and the onnxruntime snippet of docs/export.md."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from components import export
from components.config import ModelConfig
from components.inference import infer_logits
from components.models.build import build_model
from components.training.checkpoint import save_checkpoint
from pipelines import export as export_pipeline

# torch 2.13 marks torch.jit.trace/load deprecated; the TorchScript format is still asked for.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["background", "road", "tree", "sky"]


def _tiny_model(head: str = "deeplabv3", seed: int = 0) -> tuple[nn.Module, ModelConfig]:
    """A tiny model with BatchNorm statistics away from (0, 1) and a classifier scaled up, so
    the logits are of order 1-10 and their argmax varies over the image (a fresh model's are
    near 0 everywhere)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(width=0.125, head=head)
    model = build_model(cfg, len(CLASSES))
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.rand(module.num_features, generator=gen) * 0.4 - 0.2)
            module.running_var.copy_(torch.rand(module.num_features, generator=gen) * 1.5 + 0.5)
    with torch.no_grad():
        model.head.classifier.weight.mul_(30)
    return model.eval(), cfg


def _save(model: nn.Module, cfg: ModelConfig, folder: Path) -> Path:
    meta = {
        "model": dataclasses.asdict(cfg),
        "num_classes": len(CLASSES),
        "class_names": CLASSES,
        "ignore_index": 255,
        "metrics": {"miou": 0.42},
        "progress": {"iteration": 10},
    }
    save_checkpoint(folder, model.state_dict(), None, meta)
    return folder


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = export_pipeline.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny model exported to both formats at 64x96 by the pipeline (the default exporter:
    dynamo when onnxscript is installed)."""
    root = tmp_path_factory.mktemp("export")
    model, cfg = _tiny_model()
    folder = _save(model, cfg, root / "run" / "epoch_0001")
    out = root / "exported"
    code, stdout, stderr = _run(
        ["--checkpoint", str(folder.parent), "--out", str(out), "--height", "64", "--width", "96"]
    )
    return {"code": code, "stdout": stdout, "stderr": stderr, "out": out, "model": model}


def test_both_formats_match_eager_at_two_sizes(exported):
    assert exported["code"] == 0, exported["stderr"]
    out, stdout = exported["out"], exported["stdout"]
    # Four checks (2 formats x 2 sizes), each a batch of two, each printed with its difference.
    lines = re.findall(
        r"(torchscript|onnx)\s+(\d+)x(\d+) batch 2: max \|logit diff\| (\S+) .*argmax agreement "
        r"([\d.]+)%\s+ok",
        stdout,
    )
    assert {(f, h, w) for f, h, w, _, _ in lines} == {
        (f, h, w) for f in ("torchscript", "onnx") for h, w in (("64", "96"), ("49", "123"))
    }
    for _, _, _, diff, agree in lines:
        assert float(diff) <= 1e-4 and float(agree) == 100.0

    info = json.loads((out / export.PREPROCESS_FILE).read_text())
    assert info["class_names"] == CLASSES and info["num_classes"] == 4
    assert info["ignore_index"] == 255 and info["input"]["channel_order"] == "RGB"
    assert info["input"]["mean"] == [123.675, 116.28, 103.53]
    assert info["input"]["std"] == [58.395, 57.12, 57.375]
    assert info["palette"][:2] == [[0, 0, 0], [128, 0, 0]]  # generated: the VOC colour map
    assert info["opset"] == export.DEFAULT_OPSET == info["files"]["onnx"]["opset"]
    assert info["source"]["sha256"] == export.sha256_file(Path(info["source"]["file"]))
    for fmt in export.FORMATS:
        entry = info["files"][fmt]
        assert entry["sha256"] == export.sha256_file(out / entry["file"])
    assert len(info["verification"]) == 4 and all(c["ok"] for c in info["verification"])

    # Reloaded on their own, at a third size and batch size, both equal the eager logits.
    model = exported["model"]
    x = export.normalized(export.sample_images(40, 72, seed=3)[[1, 0, 1]])  # batch of 3
    ref = infer_logits(model, x).numpy()
    scripted = torch.jit.load(str(out / export.FILES["torchscript"]))
    with torch.no_grad():
        np.testing.assert_allclose(scripted(x).numpy(), ref, atol=1e-4, rtol=0)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "image" and inp.shape == ["batch", 3, "height", "width"]
    assert session.get_outputs()[0].shape == ["batch", 4, "height", "width"]
    np.testing.assert_allclose(session.run(None, {"image": x.numpy()})[0], ref, atol=1e-4, rtol=0)


def test_adaptive_pool_for_onnx_equals_torch():
    pool = export.AdaptiveAvgPool2dExport(6)
    for shape in [(2, 3, 7, 11), (1, 2, 6, 6), (1, 2, 13, 5), (1, 1, 3, 4)]:
        x = torch.randn(shape)
        torch.testing.assert_close(pool(x), nn.AdaptiveAvgPool2d(6)(x), atol=1e-6, rtol=0)
    x = torch.randn(1, 2, 9, 10)
    torch.testing.assert_close(
        export.AdaptiveAvgPool2dExport((2, 3))(x), nn.AdaptiveAvgPool2d((2, 3))(x)
    )


def test_pspnet_onnx_is_right_at_other_sizes(tmp_path):
    # PSPNet pools to 2, 3 and 6 bins: torch's exporters cannot write that for a dynamic size
    # (legacy: refuses; dynamo: fixed windows, wrong elsewhere). export_ready swaps in the
    # matrix form. The legacy exporter keeps the test fast.
    model, _ = _tiny_model("pspnet")
    x = export.normalized(export.sample_images(64, 64)[:1])
    path, used = export.export_onnx(model, x, tmp_path / "psp.onnx", exporter="legacy")
    assert used == "legacy"
    checks = export.verify(model, "onnx", path, [(64, 64), (81, 57), (100, 130)], atol=1e-4)
    assert all(c.ok for c in checks), [c.line() for c in checks]


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_size_dependent_shortcut_is_not_baked_into_the_trace(tmp_path):
    # At 64 px the DeepLabV3 map is 8x8 and every ASPP rate (12, 24, 36) is >= 8: AtrousConv2d
    # runs only its centre tap. At 160 px (20x20) rate 12 needs the full dilated conv.
    model, _ = _tiny_model()
    small = export.normalized(export.sample_images(64, 64)[:1])
    big = export.normalized(export.sample_images(160, 160)[:1])
    naive = torch.jit.trace(export.LogitsAtInputSize(model), small, check_trace=False)
    with torch.no_grad():
        naive_diff = (naive(big) - infer_logits(model, big)).abs().max().item()
    assert naive_diff > 1e-2  # what export_ready prevents
    path = export.export_torchscript(model, small, tmp_path / "m.pt")
    # Not bit-equal: eager still takes the shortcut for rates 24 and 36 on the 20x20 map.
    (check,) = export.verify(model, "torchscript", path, [(160, 160)], atol=1e-5, rtol=1e-5)
    assert check.ok, check.line()


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_a_difference_above_the_tolerance_exits_1_naming_it(fmt, tmp_path, monkeypatch):
    model, cfg = _tiny_model()
    folder = _save(model, cfg, tmp_path / "ckpt")
    real = export.RUNNERS[fmt]
    monkeypatch.setitem(export.RUNNERS, fmt, lambda path, x: real(path, x) + 0.01)
    argv = ["--checkpoint", str(folder), "--out", str(tmp_path / "out"), "--format", fmt]
    argv += ["--height", "64", "--width", "64", "--atol", "1e-3", "--rtol", "0"]
    argv += ["--exporter", "legacy"]
    code, stdout, stderr = _run(argv)
    assert code == 1
    assert re.search(
        rf"error: {fmt} at \d+x\d+: max \|logit diff\| 0\.01\d* > 0\.001 allowed", stderr
    )
    assert "FAILED" in stdout
    assert (tmp_path / "out" / export.FILES[fmt]).is_file()  # kept for inspection
    assert not (tmp_path / "out" / export.PREPROCESS_FILE).exists()


def test_bad_inputs_fail_before_any_work(tmp_path, capsys):
    code, _, stderr = _run(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path)])
    assert code == 2 and "no such file or folder" in stderr
    with pytest.raises(SystemExit):
        export_pipeline.main(["--checkpoint", "x", "--out", "y", "--format", "tflite"])
    assert "torchscript, onnx" in capsys.readouterr().err


def _doc_snippet() -> str:
    text = (ROOT / "docs" / "export.md").read_text()
    match = re.search(r"<!-- snippet: onnxruntime -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert match, "docs/export.md lost its onnxruntime snippet"
    return match.group(1)


def test_the_docs_onnxruntime_snippet_reproduces_the_prediction(exported, tmp_path, monkeypatch):
    """The code block of docs/export.md, run as written (numpy + PIL + onnxruntime only), on a
    JPEG photo: its class map is the eager model's on the same decoded pixels."""
    from PIL import Image

    code = _doc_snippet()
    imports = set(re.findall(r"^(?:import|from) (\w+)", code, re.MULTILINE))
    assert imports <= {"json", "numpy", "onnxruntime", "PIL"}, imports
    assert len([line for line in code.splitlines() if line.strip()]) <= 12
    shutil.copytree(exported["out"], tmp_path / "export")
    Image.fromarray(export.sample_images(72, 104)[0]).save(tmp_path / "photo.jpg", quality=90)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "docs/export.md", "exec"), namespace)  # noqa: S102  (our own doc)

    pixels = np.asarray(Image.open(tmp_path / "photo.jpg").convert("RGB"))
    ref = infer_logits(exported["model"], export.normalized(pixels[None])).numpy()[0].argmax(0)
    assert namespace["labels"].shape == (72, 104)
    assert (namespace["labels"] == ref).mean() > 0.999
    saved = np.asarray(Image.open(tmp_path / "prediction.png"))
    palette = np.asarray(
        json.loads((tmp_path / "export" / "preprocess.json").read_text())["palette"]
    )
    assert (saved == palette[ref]).all(axis=-1).mean() > 0.999
