import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from components.distillation.skd import pairwise_affinity, pairwise_distillation


def max_pool_ceil(x: np.ndarray, kh: int, kw: int) -> np.ndarray:
    """(B,C,H,W) max over kh×kw cells, the last row/column of cells possibly partial."""
    b, c, h, w = x.shape
    out = np.empty((b, c, math.ceil(h / kh), math.ceil(w / kw)))
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            out[:, :, i, j] = x[:, :, i * kh : (i + 1) * kh, j * kw : (j + 1) * kw].max(axis=(2, 3))
    return out


def affinity_reference(x: np.ndarray) -> np.ndarray:
    b, c = x.shape[:2]
    v = x.reshape(b, c, -1).astype(np.float64)
    n = v.shape[2]
    out = np.empty((b, n, n))
    for k in range(b):
        for i in range(n):
            for j in range(n):
                a, bb = v[k, :, i], v[k, :, j]
                out[k, i, j] = a @ bb / (np.linalg.norm(a) * np.linalg.norm(bb))
    return out


def skd_reference(student: np.ndarray, teacher: np.ndarray, kh: int, kw: int) -> float:
    a_s = affinity_reference(max_pool_ceil(student, kh, kw))
    a_t = affinity_reference(max_pool_ceil(teacher, kh, kw))
    b, n = a_s.shape[:2]
    return float(((a_s - a_t) ** 2).sum() / (n * n) / b)


def test_affinity_is_cosine_between_positions():
    x = torch.randn(2, 3, 2, 3)
    got = pairwise_affinity(x)
    assert got.shape == (2, 6, 6)
    np.testing.assert_allclose(got.numpy(), affinity_reference(x.numpy()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("shape", "pool_size", "kernel"),
    [((2, 3, 4, 4), 2, (2, 2)), ((2, 3, 5, 5), 2, (2, 2)), ((2, 3, 7, 6), None, (3, 3))],
)
def test_matches_numpy_reference(shape, pool_size, kernel):
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    expected = skd_reference(student.numpy(), teacher.numpy(), *kernel)
    got = pairwise_distillation(student, teacher, pool_size=pool_size, scale=0.5)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_channel_counts_may_differ():
    student, teacher = torch.randn(2, 5, 4, 4), torch.randn(2, 3, 4, 4)
    expected = skd_reference(student.numpy(), teacher.numpy(), 2, 2)
    assert pairwise_distillation(student, teacher).item() == pytest.approx(expected, rel=1e-5)


def test_zero_when_equal_and_invariant_to_positive_scale():
    student, teacher = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert pairwise_distillation(teacher.clone(), teacher).item() == pytest.approx(0, abs=1e-10)
    assert pairwise_distillation(7.5 * teacher, teacher).item() == pytest.approx(0, abs=1e-10)
    base = pairwise_distillation(student, teacher).item()
    assert base > 1e-3
    assert pairwise_distillation(0.2 * student, 3 * teacher).item() == pytest.approx(base, rel=1e-5)


def test_student_resized_not_cropped():
    student, teacher = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)
    resized = F.interpolate(student, size=(4, 4), mode="bilinear", align_corners=False)
    got = pairwise_distillation(student, teacher).item()
    assert got == pytest.approx(pairwise_distillation(resized, teacher).item(), rel=1e-6)
    assert abs(got - pairwise_distillation(student[..., :4, :4], teacher).item()) > 1e-4


def test_batch_mismatch_names_both_shapes():
    with pytest.raises(
        ValueError, match=re.escape("(3, 3, 4, 4)") + ".*" + re.escape("(2, 3, 4, 4)")
    ):
        pairwise_distillation(torch.randn(3, 3, 4, 4), torch.randn(2, 3, 4, 4))


def test_gradient_reaches_student_only():
    student = torch.randn(2, 3, 4, 4, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 4, requires_grad=True)
    pairwise_distillation(student, teacher, pool_size=1).backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert teacher.grad is None
