"""The EMA teacher follows θ_t ← α θ_t + (1 − α) θ_s for parameters and float buffers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from components.semisup.ema import EMATeacher, ema_factor


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def test_ema_factor_ramps_then_caps():
    assert [ema_factor(0.99, t) for t in range(3)] == pytest.approx([0.0, 0.5, 2 / 3])
    assert ema_factor(0.99, 10_000) == 0.99


def test_update_equals_the_formula_for_parameters_and_buffers():
    student = _net()
    ema = EMATeacher(student, momentum=0.9)
    ema.updates = 50  # past the ramp: α = 0.9
    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    # Change the student: parameters by hand, BatchNorm buffers through a training forward.
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.train()
    student(torch.randn(2, 3, 8, 8))
    s_state = student.state_dict()
    alpha = ema.update(student)
    assert alpha == pytest.approx(0.9)
    after = ema.model.state_dict()
    for name, value in after.items():
        if value.dtype.is_floating_point:
            expected = 0.9 * before[name] + 0.1 * s_state[name]
            torch.testing.assert_close(value, expected, msg=name)
        else:  # num_batches_tracked: copied
            assert torch.equal(value, s_state[name]), name
    assert "1.running_mean" in after and not torch.equal(
        after["1.running_mean"], before["1.running_mean"]
    )
    assert ema.updates == 51


def test_first_update_copies_the_student_and_teacher_is_frozen():
    student = _net()
    ema = EMATeacher(student, momentum=0.999)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(3)
    ema.update(student)  # α = 0
    for (name, t), s in zip(ema.model.state_dict().items(), student.state_dict().values()):
        torch.testing.assert_close(t, s, msg=name)
    assert not ema.model.training
    assert all(not p.requires_grad for p in ema.model.parameters())


def test_state_round_trip_and_bad_momentum():
    student = _net()
    ema = EMATeacher(student, 0.99)
    ema.update(student)
    ema.update(student)
    other = EMATeacher(_net(), 0.99)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 2
    for a, b in zip(other.model.state_dict().values(), ema.model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="momentum"):
        EMATeacher(student, 1.0)
