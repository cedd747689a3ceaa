import numpy as np
import pytest
import torch

from components.metrics import confusion_matrix, format_table, miou, pixel_accuracy


def reference_confusion(pred: np.ndarray, target: np.ndarray, k: int, ignore: int = 255):
    keep = target != ignore
    return np.bincount(k * target[keep] + pred[keep], minlength=k * k).reshape(k, k)


def test_confusion_matches_numpy_bincount():
    rng = np.random.default_rng(0)
    k = 5
    target = rng.integers(0, k, size=(3, 17, 13))
    target[rng.random(target.shape) < 0.2] = 255
    pred = rng.integers(0, k, size=target.shape)
    got = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), k)
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), reference_confusion(pred, target, k))


def test_miou_hand_computed_and_absent_class_excluded():
    # rows = target, cols = prediction; class 2 never appears in target nor prediction.
    conf = torch.tensor([[3, 1, 0], [2, 4, 0], [0, 0, 0]])
    mean, per_class = miou(conf)
    assert per_class[0].item() == pytest.approx(3 / (3 + 1 + 2))
    assert per_class[1].item() == pytest.approx(4 / (4 + 2 + 1))
    assert torch.isnan(per_class[2])
    assert mean == pytest.approx((3 / 6 + 4 / 7) / 2)
    assert pixel_accuracy(conf) == pytest.approx(7 / 10)


def test_class_predicted_but_absent_counts_as_zero():
    conf = torch.tensor([[2, 1], [0, 0]])  # class 1 predicted once, never in target
    mean, per_class = miou(conf)
    assert per_class[1].item() == 0.0
    assert mean == pytest.approx((2 / 3 + 0) / 2)


def test_bad_inputs():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 3)
    with pytest.raises(ValueError, match="differ"):
        confusion_matrix(torch.zeros(2, 2), torch.zeros(2, 3), 3)


def test_format_table_lists_classes():
    text = format_table(torch.tensor([[3, 1], [0, 4]]), ["road", "car"])
    assert "road" in text and "car" in text and "mIoU" in text and "pixel acc" in text
