"""The run folder's record: TensorBoard events read back with tensorboard's own reader,
metrics.jsonl and console.log, continued without duplicates across a resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from components.training.runlog import RunLog, colour, panel, to_rgb

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (
    EventAccumulator,
)


def _read(folder) -> EventAccumulator:
    events = EventAccumulator(
        str(folder / "tensorboard"), size_guidance={"scalars": 0, "images": 0}
    )
    events.Reload()
    return events


def _run(folder, start: int, stop: int, resume: int, value: float, echo=False) -> None:
    log = RunLog(str(folder), resume_iteration=resume, echo=echo)
    for it in range(start, stop + 1):
        log.step(it, {"loss": value + it, "ce": value}, lr=0.01, data_wait_s=0.001)
        if it % 4 == 0:  # an epoch of 4 steps
            metrics = {"iteration": it, "miou": it / 100, "pixel_acc": 0.5}
            panels = {"img-0": np.zeros((8, 26, 3), np.uint8)}
            log.evaluation(it, metrics, {"background": 0.7, "cat": float("nan")}, panels)
            log.row(metrics)
            log.line(f"epoch {it // 4}: val mIoU {it}")
    log.close()


def test_scalars_images_rows_and_console_are_written(tmp_path):
    _run(tmp_path, 1, 8, resume=0, value=0.0, echo=True)
    events = _read(tmp_path)
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(list(range(1, 9)))
    assert {"train/ce", "train/lr", "train/data_wait_s", "val/miou", "val/pixel_acc"} <= set(
        events.Tags()["scalars"]
    )
    assert [e.step for e in events.Scalars("val/iou/background")] == [4, 8]
    assert "val/iou/cat" not in events.Tags()["scalars"]  # absent class (NaN): no point
    images = events.Images("val_images/img-0")
    assert [i.step for i in images] == [4, 8]
    assert (images[-1].width, images[-1].height) == (26, 8)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [4, 8]
    assert (tmp_path / "console.log").read_text().splitlines() == [
        "epoch 1: val mIoU 4",
        "epoch 2: val mIoU 8",
    ]


def test_a_resume_continues_the_curves_without_duplicates(tmp_path):
    # The first run died at iteration 10, after its checkpoint at 8; the resumed one starts at 8.
    _run(tmp_path, 1, 10, resume=0, value=0.0)
    _run(tmp_path, 9, 12, resume=8, value=100.0)
    events = _read(tmp_path)
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 13))  # 9 and 10 once, from the second run
    assert [e.value for e in loss][8:] == pytest.approx([109.0, 110.0, 111.0, 112.0])
    assert [e.step for e in events.Scalars("val/miou")] == [4, 8, 12]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [4, 8, 12]
    assert len((tmp_path / "console.log").read_text().splitlines()) == 2 + 1  # appended


def test_panels_are_the_image_and_the_maps_in_the_palette():
    palette = [[0, 0, 0], [255, 0, 0], [0, 255, 0]]
    labels = np.array([[0, 1], [2, 255]])
    np.testing.assert_array_equal(
        colour(labels, palette), [[[0, 0, 0], [255, 0, 0]], [[0, 255, 0], [0, 0, 0]]]
    )
    image = np.full((2, 2, 3), 7, np.uint8)
    row = panel(image, [labels, labels], palette)
    assert row.shape == (2, 2 + 2 + 2 + 2 + 2, 3)
    np.testing.assert_array_equal(row[:, :2], image)
    np.testing.assert_array_equal(row[:, 2:4], 255)  # the white gap
    np.testing.assert_array_equal(row[:, 4:6], colour(labels, palette))
    # The normalisation of the data path, undone.
    from components.data.augment import normalize

    rgb = np.arange(2 * 3 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 3) * 4
    np.testing.assert_array_equal(to_rgb(normalize(rgb)[1]), rgb[1])


def test_val_panels_show_truth_and_each_models_prediction():
    import torch

    from components.config import ModelConfig
    from components.models.build import build_model
    from components.training.runlog import predict_labels, val_panels

    torch.manual_seed(0)
    model = build_model(ModelConfig(width=0.125), 3)
    rng = np.random.default_rng(0)
    rows = {
        "id": np.array(["a", "b"], dtype=object),
        "image": rng.standard_normal((2, 3, 32, 32)).astype(np.float32),
        "mask": rng.integers(0, 3, (2, 32, 32)),
        "valid": np.array([True, False]),
    }
    palette = [[0, 0, 0], [255, 0, 0], [0, 255, 0]]
    panels = val_panels([model, model], rows, palette, 255, torch.device("cpu"))
    assert list(panels) == ["a"]  # the undecodable row is left out
    row = panels["a"]
    assert row.shape == (32, 4 * 32 + 3 * 2, 3)
    np.testing.assert_array_equal(row[:, 34:66], colour(rows["mask"][0], palette))
    pred = predict_labels(model, torch.from_numpy(rows["image"]))[0]
    np.testing.assert_array_equal(row[:, 68:100], colour(pred, palette))
    assert model.training  # put back in the mode it was in
