"""pipelines/evaluate.py end to end on a tiny checkpoint, in this process: Ray Data's decoding is
replaced by the same decoder run in the driver (the Ray path is covered by the slow pipeline
tests, which call evaluate.main after training)."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

from components.config import ModelConfig
from components.data.decode import decode_split
from components.data.device import model_batch
from components.data.shards import DatasetInfo
from components.inference import EvalMode
from components.metrics import boundary_iou, miou
from components.models.build import build_model
from components.training.checkpoint import save_checkpoint
from components.training.evaluation import evaluate_counts
from pipelines import evaluate


class _DecodedSplit:
    """Stands in for the Ray dataset: the split decoded by `decode_split`, in batches."""

    def __init__(self, root: str, info: DatasetInfo, split: str) -> None:
        self.columns = decode_split(root, info, split, normalized=False)  # as eval_dataset

    def iter_torch_batches(self, batch_size: int, dtypes: dict):
        n = len(self.columns["valid"])
        for i in range(0, n, batch_size):
            yield {
                k: torch.as_tensor(np.asarray(self.columns[k][i : i + batch_size])).to(t)
                for k, t in dtypes.items()
            }


@pytest.fixture
def checkpoint(tmp_path, tiny_data, monkeypatch):
    import pipelines._common as common
    from components.data import ingest

    monkeypatch.setattr(common, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(ingest, "eval_dataset", _DecodedSplit)
    torch.manual_seed(0)
    cfg = ModelConfig(width=0.125)
    model = build_model(cfg, num_classes=4)
    folder = tmp_path / "run" / "epoch_0001"
    meta = {"num_classes": 4, "model": dataclasses.asdict(cfg), "progress": {"iteration": 1}}
    save_checkpoint(folder, model.state_dict(), None, meta)
    return folder, model


def test_slide_multiscale_flip_boundary_and_png(checkpoint, tiny_data, tmp_path, capsys):
    folder, model = checkpoint
    png = tmp_path / "plots" / "confusion.png"
    args = ["--checkpoint", str(folder.parent), "--data", tiny_data, "--batch-size", "5"]
    args += ["--mode", "slide", "--crop", "16,16", "--stride", "8,12", "--scales", "0.75,1.0"]
    args += ["--flip", "--boundary-width", "2", "--confusion-png", str(png)]
    assert evaluate.main(args) == 0
    out = capsys.readouterr().out
    assert "mode: slide (crop 16x16, stride 8x12), scales 0.75,1, flip" in out
    assert "bands of 2 px" in out and "bIoU@2px" in out
    assert f"confusion matrix: {png}" in out
    from PIL import Image

    assert Image.open(png).format == "PNG"

    # The printed numbers are those of the evaluator on the same batches and mode.
    info = DatasetInfo.load(tiny_data)
    mode = EvalMode("slide", (16, 16), (8, 12), (0.75, 1.0), True)
    batches = _DecodedSplit(tiny_data, info, "val").iter_torch_batches(
        5, {"image": torch.uint8, "mask": torch.uint8, "valid": torch.bool}
    )
    batches = map(model_batch, batches)
    counts = evaluate_counts(model, batches, 4, info.ignore_index, mode=mode, boundary_width=2)
    shown = re.search(r"mIoU\s+([0-9.]+)\s+([0-9.]+)", out)
    assert float(shown.group(1)) == pytest.approx(100 * miou(counts.confusion)[0], abs=0.005)
    assert float(shown.group(2)) == pytest.approx(100 * boundary_iou(counts.boundary)[0], abs=0.005)


def test_default_is_whole_with_png_in_checkpoint_folder(checkpoint, tiny_data, capsys):
    folder, _ = checkpoint
    assert evaluate.main(["--checkpoint", str(folder), "--data", tiny_data]) == 0
    out = capsys.readouterr().out
    assert "mode: whole\n" in out and "bIoU" not in out
    assert (folder / "confusion_val.png").is_file()
    assert f"confusion matrix: {folder / 'confusion_val.png'}" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mode", "slide", "--crop", "16,16"], "needs a crop and a stride"),
        (["--mode", "slide", "--crop", "16,16", "--stride", "8,20"], "must not exceed the crop"),
        (["--crop", "16,16"], "only apply to mode 'slide'"),
        (["--scales", "0.5,0"], "scales must be > 0"),
        (["--boundary-width", "0"], "--boundary-width must be >= 1"),
    ],
)
def test_bad_mode_flags_fail_clearly(checkpoint, tiny_data, capsys, extra, message):
    folder, _ = checkpoint
    assert evaluate.main(["--checkpoint", str(folder), "--data", tiny_data, *extra]) == 2
    assert message in capsys.readouterr().err


def test_a_bare_released_file_is_described_by_overrides(checkpoint, tiny_data, tmp_path, capsys):
    """A torchvision-layout state_dict (key names and shapes of deeplabv3_resnet50, at width
    1/8 and 4 classes; tests/layout_keys.py) evaluates when model.* overrides describe it, and
    gives the table of the same weights converted to our layout and saved in a checkpoint."""
    from layout_keys import torchvision_deeplabv3

    from components.models.convert import convert_state_dict

    torch.manual_seed(1)
    shapes = torchvision_deeplabv3(depth=50, base=8, head=32, nclass=4)
    state = {
        k: (torch.randint(0, 5, s) if k.endswith("num_batches_tracked") else torch.rand(s) + 0.5)
        for k, s in shapes.items()
    }
    released = tmp_path / "deeplabv3_resnet50.pth"
    torch.save(state, released)
    describe = ["model.backbone=resnet50", "model.width=0.125", "--confusion-png", "none"]
    assert evaluate.main(["--checkpoint", str(released), "--data", tiny_data, *describe]) == 0
    table = capsys.readouterr().out.split("\n\n", 1)[1]

    cfg = ModelConfig(backbone="resnet50", width=0.125)
    ours = convert_state_dict(state, build_model(cfg, 4))
    folder = tmp_path / "ours" / "epoch_0001"
    meta = {"num_classes": 4, "model": dataclasses.asdict(cfg), "progress": {"iteration": 1}}
    save_checkpoint(folder, ours, None, meta)
    assert evaluate.main(["--checkpoint", str(folder), "--data", tiny_data, *describe[2:]]) == 0
    assert capsys.readouterr().out.split("\n\n", 1)[1] == table

    # Undescribed, or described as another network: a clear error, nothing evaluated.
    assert evaluate.main(["--checkpoint", str(released), "--data", tiny_data]) == 2
    assert "bare state_dict file" in capsys.readouterr().err
    wrong = ["model.backbone=resnet18", "model.width=0.125"]
    assert evaluate.main(["--checkpoint", str(released), "--data", tiny_data, *wrong]) == 2
    err = capsys.readouterr().err
    assert str(released) in err and "fits this model only in part" in err
    assert evaluate.main(["--checkpoint", str(released), "--data", tiny_data, "data.root=x"]) == 2
    assert "only model.* overrides" in capsys.readouterr().err
