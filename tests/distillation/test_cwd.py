import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from components.distillation.cwd import channel_wise_distillation


def cwd_reference(student: np.ndarray, teacher: np.ndarray, tau: float) -> float:
    """Explicit loop over (sample, channel): KL of the spatial softmaxes, / (B·C), · tau²."""
    b, c = student.shape[:2]
    total = 0.0
    for i in range(b):
        for k in range(c):
            s = student[i, k].ravel().astype(np.float64) / tau
            t = teacher[i, k].ravel().astype(np.float64) / tau
            p_s = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            p_t = np.exp(t - t.max()) / np.exp(t - t.max()).sum()
            total += float(np.sum(p_t * (np.log(p_t) - np.log(p_s))))
    return total / (b * c) * tau * tau


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_matches_numpy_reference(tau):
    g = torch.Generator().manual_seed(0)
    student, teacher = (
        torch.randn(2, 3, 4, 4, generator=g),
        3 * torch.randn(2, 3, 4, 4, generator=g),
    )
    expected = cwd_reference(student.numpy(), teacher.numpy(), tau)
    got = channel_wise_distillation(student, teacher, tau)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_zero_when_equal_positive_otherwise():
    x = torch.randn(2, 3, 4, 4)
    assert channel_wise_distillation(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert channel_wise_distillation(torch.randn(2, 3, 4, 4), x).item() > 1e-3


def test_half_precision_inputs_computed_in_float32():
    s, t = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    got = channel_wise_distillation(s.half(), t.half())
    assert got.dtype == torch.float32
    expected = cwd_reference(s.half().float().numpy(), t.half().float().numpy(), 4.0)
    assert got.item() == pytest.approx(expected, rel=1e-4)


def test_student_resized_not_cropped():
    student, teacher = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)
    resized = F.interpolate(student, size=(4, 4), mode="bilinear", align_corners=False)
    got = channel_wise_distillation(student, teacher)
    assert got.item() == pytest.approx(channel_wise_distillation(resized, teacher).item(), rel=1e-6)
    cropped = channel_wise_distillation(student[..., :4, :4], teacher).item()
    assert abs(got.item() - cropped) > 1e-4


@pytest.mark.parametrize("shape", [(2, 4, 4, 4), (3, 3, 4, 4), (2, 3, 16)])
def test_shape_mismatch_names_both_shapes(shape):
    teacher = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=re.escape(str(shape)) + ".*" + re.escape("(2, 3, 4, 4)")):
        channel_wise_distillation(torch.randn(*shape), teacher)


def test_gradient_reaches_student_only():
    student = torch.randn(2, 3, 4, 4, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 4, requires_grad=True)
    channel_wise_distillation(student, teacher).backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_normalised_by_the_students_channels_before_projection_as_cirkd():
    """CIRKD's CriterionCWD (losses/cwd.py:60-83) takes n, c from the student's map *before*
    its 1x1 conv to the teacher's channels and divides the KL summed over the teacher's
    channel maps by n·c_student. Student 2 channels -> teacher 4: twice the per-map mean."""
    g = torch.Generator().manual_seed(3)
    student = torch.randn(2, 2, 4, 4, generator=g)
    teacher = 2 * torch.randn(2, 4, 4, 4, generator=g)
    conv = torch.nn.Conv2d(2, 4, 1, bias=False)  # CIRKD's alignment conv: bias-free, no BN
    projected = conv(student).detach()
    per_map_mean = cwd_reference(projected.numpy(), teacher.numpy(), 4.0)  # / (B·4) · 16
    got = channel_wise_distillation(projected, teacher, 4.0, student_channels=2)
    assert got.item() == pytest.approx(2 * per_map_mean, rel=1e-5)  # / (B·2) · 16
    # Without a projection (logits: C_s = C = K) the count is the maps' own.
    same = channel_wise_distillation(projected, teacher, 4.0)
    assert same.item() == pytest.approx(per_map_mean, rel=1e-5)


def test_feature_term_divides_by_the_student_models_embed_channels():
    from types import SimpleNamespace

    from components.distillation.cwd import CWD_FEATURE, CWD_LOGIT

    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    settings = SimpleNamespace(cwd_temperature=4.0)
    plain = channel_wise_distillation(s, t, 4.0).item()
    view = SimpleNamespace(settings=settings, student_channels={"embed": 2, "low": 1})
    assert CWD_FEATURE.compute(s, t, view, None).item() == pytest.approx(2 * plain, rel=1e-6)
    assert CWD_LOGIT.compute(s, t, view, None).item() == pytest.approx(plain, rel=1e-6)
    # A view without the student's channel counts: C_s = C.
    bare = SimpleNamespace(settings=settings)
    assert CWD_FEATURE.compute(s, t, bare, None).item() == pytest.approx(plain, rel=1e-6)
