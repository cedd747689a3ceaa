"""Pixel-wise logit distillation (Hinton et al. 2015, applied per pixel as in SKD/CIRKD)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from components.distillation.term import StepView, Term


def pixel_kd(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean over pixels of T^2 * KL(softmax(teacher/T) || softmax(student/T)) over classes.

    student, teacher: (B,K,h,w) logits. When their spatial sizes differ the student's logits are
    resized (bilinear) to the teacher's — never cropped. Returns a scalar.
    """
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"student logits {tuple(student.shape)} and teacher {tuple(teacher.shape)} need the "
            "same batch size and class count"
        )
    if student.shape[-2:] != teacher.shape[-2:]:
        student = F.interpolate(
            student, size=teacher.shape[-2:], mode="bilinear", align_corners=False
        )
    t = temperature
    log_p_s = F.log_softmax(student.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher.float() / t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)  # (B,h,w)
    return kl.mean() * t * t


def _pixel_kd_term(student: Tensor, teacher: Tensor, view: StepView, _state) -> Tensor:
    return pixel_kd(student, teacher, view.settings.temperature)


# Logit KD on the logits (`method.temperature`).
PIXEL_KD = Term(_pixel_kd_term)
