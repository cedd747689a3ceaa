"""Channel-wise distillation (Shu et al., "Channel-wise Knowledge Distillation for Dense
Prediction", ICCV 2021), normalised as CIRKD's `CriterionCWD` (winycg/CIRKD, losses/cwd.py),
whose weights (features x50, logits x3, tau 4: train_scripts/train_kd/train_cwd.sh) our configs
quote."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from components.distillation.term import StepView, Term


def channel_wise_distillation(
    student: Tensor, teacher: Tensor, tau: float = 4.0, student_channels: int | None = None
) -> Tensor:
    """CWD: KL between per-channel spatial softmaxes, as in the paper and the CIRKD code.

    student, teacher: (B,C,H,W) maps (features or logits) with the same B and C; a projector
    upstream makes the channel counts agree. A student of another spatial size is resized
    (bilinear) to the teacher's — never cropped. Returns a scalar, computed in float32:

        tau² / (B·C_s) · Σ_{b,c} Σ_{i∈H·W} p_t(i) · (log p_t(i) − log p_s(i)),
        p(i) = softmax over the H·W positions of x[b,c] / tau,

    the sum over all C (teacher) channel maps. C_s is `student_channels`, the student's channel
    count *before* the projection to the teacher's C (default: C, when no projection was
    needed). That is CIRKD's normalisation: `CriterionCWD.forward` (losses/cwd.py:60-83) reads
    `n, c` from the student's map before its bias-free 1x1 conv to the teacher's channels
    (applied only when the counts differ, lines 62-63) and divides the summed KL by n·c, times
    T². With its DeepLabV3 heads of the CIRKD paper (R18: 128 channels, R101: 256; models/
    deeplabv3.py at 2d8ad0f, lines 77-81) the feature term is twice the mean KL per channel map,
    and its weight 50 means that. For logits C_s = C = K. The teacher is detached.
    """
    if student.ndim != 4 or teacher.ndim != 4 or student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must be (B,C,H,W) "
            "maps with the same batch size and channel count"
        )
    if student_channels is not None and student_channels < 1:
        raise ValueError(f"student_channels must be >= 1, got {student_channels}")
    if student.shape[-2:] != teacher.shape[-2:]:
        student = F.interpolate(
            student.float(), size=teacher.shape[-2:], mode="bilinear", align_corners=False
        )
    b, c = teacher.shape[:2]
    log_p_s = F.log_softmax(student.float().reshape(b, c, -1) / tau, dim=-1)
    log_p_t = F.log_softmax(teacher.detach().float().reshape(b, c, -1) / tau, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    return kl / (b * (student_channels or c)) * tau * tau


def _cwd_logit_term(student: Tensor, teacher: Tensor, view: StepView, _state) -> Tensor:
    return channel_wise_distillation(student, teacher, view.settings.cwd_temperature)


def _cwd_feature_term(student: Tensor, teacher: Tensor, view: StepView, _state) -> Tensor:
    # `student` is the adapted map (the teacher's channel count); CIRKD divides by the student
    # model's own `embed` channels, which the step's view carries as `student_channels` (the
    # student's `feature_channels`) where the distiller provides it; otherwise C_s = C.
    channels = (getattr(view, "student_channels", None) or {}).get("embed")
    return channel_wise_distillation(
        student, teacher, view.settings.cwd_temperature, student_channels=channels
    )


# CWD on the logits, and on the pre-classifier `embed` map through the adapter
# (`method.cwd_temperature` for both).
CWD_LOGIT = Term(_cwd_logit_term)
CWD_FEATURE = Term(_cwd_feature_term, feature="embed")
