"""Channel-wise distillation (Shu et al., "Channel-wise Knowledge Distillation for Dense
Prediction", ICCV 2021)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from components.distillation.term import StepView, Term


def channel_wise_distillation(student: Tensor, teacher: Tensor, tau: float = 4.0) -> Tensor:
    """CWD: KL between per-channel spatial softmaxes, as in the paper and the CIRKD code.

    student, teacher: (B,C,H,W) maps (features or logits) with the same B and C; a projector
    upstream makes the channel counts agree. A student of another spatial size is resized
    (bilinear) to the teacher's — never cropped. Returns a scalar, computed in float32:

        tau² / (B·C) · Σ_{b,c} Σ_{i∈H·W} p_t(i) · (log p_t(i) − log p_s(i)),
        p(i) = softmax over the H·W positions of x[b,c] / tau,

    i.e. KL summed over space, averaged over the B·C channel maps, times tau² — the normalisation
    of the reference implementations (`CriterionCWD`, norm 'channel', divergence 'kl': summed KL
    divided by C·B, times T²). The teacher is detached. Faithful to the paper and the reference
    code; the reference's in-loss 1×1 conv for mismatched channels lives upstream here.
    """
    if student.ndim != 4 or teacher.ndim != 4 or student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must be (B,C,H,W) "
            "maps with the same batch size and channel count"
        )
    if student.shape[-2:] != teacher.shape[-2:]:
        student = F.interpolate(
            student.float(), size=teacher.shape[-2:], mode="bilinear", align_corners=False
        )
    b, c = teacher.shape[:2]
    log_p_s = F.log_softmax(student.float().reshape(b, c, -1) / tau, dim=-1)
    log_p_t = F.log_softmax(teacher.detach().float().reshape(b, c, -1) / tau, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    return kl / (b * c) * tau * tau


def _cwd_term(student: Tensor, teacher: Tensor, view: StepView, _state) -> Tensor:
    return channel_wise_distillation(student, teacher, view.settings.cwd_temperature)


# CWD on the logits, and on the pre-classifier `embed` map through the adapter
# (`method.cwd_temperature` for both).
CWD_LOGIT = Term(_cwd_term)
CWD_FEATURE = Term(_cwd_term, feature="embed")
