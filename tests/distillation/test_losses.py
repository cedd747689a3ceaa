import math

import pytest
import torch

from components.distillation.logits import pixel_kd
from components.distillation.protocol import segmentation_ce


def test_pixel_kd_hand_computed():
    # One pixel, two classes: teacher logits (0, ln 3) -> p_t = (1/4, 3/4); student (0, 0).
    teacher = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1)
    student = torch.zeros(1, 2, 1, 1)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert pixel_kd(student, teacher, 1.0).item() == pytest.approx(expected, rel=1e-6)
    # With T = 2: logits halved, scaled by T^2.
    p = torch.softmax(torch.tensor([0.0, math.log(3.0) / 2]), 0)
    expected_t2 = 4 * float((p * (p / 0.5).log()).sum())
    assert pixel_kd(student, teacher, 2.0).item() == pytest.approx(expected_t2, rel=1e-6)


def test_pixel_kd_zero_when_equal_and_positive_otherwise():
    x = torch.randn(2, 5, 4, 4)
    assert pixel_kd(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert pixel_kd(torch.randn(2, 5, 4, 4), x).item() > 0


def test_pixel_kd_resizes_student_and_gives_gradient():
    student = torch.randn(1, 3, 4, 4, requires_grad=True)
    teacher = torch.randn(1, 3, 8, 8)
    loss = pixel_kd(student, teacher)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="class count"):
        pixel_kd(torch.randn(1, 4, 4, 4), teacher)


def test_segmentation_ce_matches_reference_and_ignores():
    logits = torch.randn(2, 3, 4, 4)
    mask = torch.randint(0, 3, (2, 4, 4))
    mask[0, 0, 0] = 255
    keep = mask != 255
    ref = -torch.log_softmax(logits, 1).gather(1, mask.clamp(max=2)[:, None])[:, 0][keep].mean()
    assert segmentation_ce(logits, mask).item() == pytest.approx(ref.item(), rel=1e-6)


def test_segmentation_ce_all_ignored_is_zero_not_nan():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = segmentation_ce(logits, torch.full((1, 4, 4), 255))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()
