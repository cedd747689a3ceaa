"""components/training/evaluation.py: the split evaluator with evaluation modes and boundary IoU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from components.config import ModelConfig
from components.inference import EvalMode
from components.metrics import boundary_counts, confusion_matrix
from components.models.build import build_model
from components.training.evaluation import evaluate_counts, predict_confusion

K = 4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(width=0.125), num_classes=K)


def _batches(n: int = 3, b: int = 2, h: int = 24, w: int = 32):
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        mask = torch.randint(0, K, (b, h, w), generator=g)
        mask[:, :, -5:] = 255  # padding, as the eval decoder pads to the split's largest image
        valid = torch.ones(b, dtype=torch.bool)
        valid[0] = i != 1  # one undecodable row
        out.append({"image": torch.randn(b, 3, h, w, generator=g), "mask": mask, "valid": valid})
    return out


def _old_predict_confusion(model, batches, num_classes, ignore_index=255):
    """The evaluator before evaluation modes (one whole pass), for comparison."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    with torch.no_grad():
        for batch in batches:
            keep = batch["valid"]
            images, masks = batch["image"][keep], batch["mask"][keep]
            logits = F.interpolate(
                model(images)["logits"].float(),
                size=masks.shape[-2:],
                mode="bilinear",
                align_corners=False,
            )
            confusion += confusion_matrix(logits.argmax(1), masks, num_classes, ignore_index)
    return confusion


def test_existing_call_unchanged(model):
    batches = _batches()
    model.train()
    got = predict_confusion(model, batches, K, 255, None)
    assert model.training  # the model's mode is restored
    expected = _old_predict_confusion(model, batches, K)
    assert torch.equal(got, expected)
    assert int(got.sum()) == (3 * 2 - 1) * 24 * 27  # valid rows x unpadded pixels
    assert torch.equal(predict_confusion(model, batches, K, mode=EvalMode()), expected)


def test_modes_and_boundary_counts(model):
    batches = _batches()
    mode = EvalMode("slide", crop=(16, 16), stride=(8, 12), scales=(0.75, 1.0), flip=True)
    counts = evaluate_counts(model, batches, K, mode=mode, boundary_width=2)
    assert counts.boundary_width == 2 and counts.boundary.shape == (2, K)
    assert int(counts.confusion.sum()) == 5 * 24 * 27
    # Different passes, different predictions (the same counts would mean the mode was ignored).
    assert not torch.equal(counts.confusion, _old_predict_confusion(model, batches, K))
    assert torch.equal(counts.confusion, predict_confusion(model, batches, K, mode=mode))
    # The boundary counts are those of the predictions the confusion matrix was built from.
    from components.inference import infer_logits

    model.eval()
    expected = torch.zeros(2, K, dtype=torch.int64)
    for batch in batches:
        keep = batch["valid"]
        pred = infer_logits(model, batch["image"][keep], mode).argmax(1)
        expected += boundary_counts(pred, batch["mask"][keep], K, 2)
    assert torch.equal(counts.boundary, expected)
    assert (counts.boundary[0] <= counts.boundary[1]).all() and counts.boundary[1].sum() > 0
    assert evaluate_counts(model, batches, K).boundary is None


@pytest.mark.parametrize("width", [0, -1, 1.5, True])
def test_bad_boundary_width(model, width):
    with pytest.raises(ValueError, match="boundary width"):
        evaluate_counts(model, _batches(n=1), K, boundary_width=width)
