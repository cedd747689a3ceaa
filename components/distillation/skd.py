"""Pair-wise distillation from SKD (Liu et al., "Structured Knowledge Distillation for Semantic
Segmentation", CVPR 2019; "... for Dense Prediction", TPAMI 2020)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from components.distillation.term import StepView, Term


def pairwise_affinity(feat: Tensor) -> Tensor:
    """Cosine similarity between all pairs of spatial positions of each sample.

    feat: (B,C,H,W). Each position's C-vector is L2-normalised (an all-zero vector stays zero).
    Returns (B,H·W,H·W) float32, positions in row-major (H, W) order.
    """
    if feat.ndim != 4:
        raise ValueError(f"expected a (B,C,H,W) map, got {tuple(feat.shape)}")
    z = F.normalize(feat.float().flatten(2), dim=1)  # (B,C,HW)
    return z.transpose(1, 2) @ z


def pairwise_distillation(
    student: Tensor, teacher: Tensor, pool_size: int | None = 2, scale: float = 0.5
) -> Tensor:
    """SKD pair-wise loss: squared difference of pooled-feature affinity matrices.

    student: (B,C_s,H_s,W_s), teacher: (B,C_t,H,W). Channel counts may differ (affinities do not
    depend on C); a student of another spatial size is resized (bilinear) to the teacher's, never
    cropped. Both maps are max-pooled with kernel = stride = k, ceil_mode=True (each pooled cell
    is one graph node), where k = (pool_size, pool_size) — the CIRKD protocol
    (`CriterionStructuralKD`, 2×2, λ 10) — or, with pool_size=None, k = (int(H·scale),
    int(W·scale)) of the teacher map, as in the original SKD code
    (`CriterionPairWiseforWholeFeatAfterPool`, pool scale 0.5). k is clamped to [1, map size].
    With pooled maps of n = h·w nodes, A = pairwise_affinity(·) and the teacher detached:

        loss = 1/(B·n²) · Σ_b Σ_{i,j} (A_s[b,i,j] − A_t[b,i,j])²

    — the mean over all affinity entries, which is both references' normalisation (SKD: summed
    squared error / (n²) / B; CIRKD: `.mean()`). Zero when the maps are equal; invariant to a
    positive rescaling of either map. Computed in float32. Unlike the original SKD code, which
    detaches the L2 norm, gradients flow through the normalisation (as in CIRKD's code).
    """
    if student.ndim != 4 or teacher.ndim != 4 or student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must be (B,C,H,W) "
            "maps with the same batch size"
        )
    h, w = teacher.shape[-2:]
    if student.shape[-2:] != (h, w):
        student = F.interpolate(student.float(), size=(h, w), mode="bilinear", align_corners=False)
    if pool_size is None:
        kernel = (int(h * scale), int(w * scale))
    else:
        kernel = (pool_size, pool_size)
    kernel = (min(max(kernel[0], 1), h), min(max(kernel[1], 1), w))
    if kernel != (1, 1):
        student = F.max_pool2d(student.float(), kernel, stride=kernel, ceil_mode=True)
        teacher = F.max_pool2d(teacher.detach().float(), kernel, stride=kernel, ceil_mode=True)
    diff = pairwise_affinity(student) - pairwise_affinity(teacher.detach())
    return diff.pow(2).mean()


def _pairwise_term(student: Tensor, teacher: Tensor, view: StepView, _state) -> Tensor:
    return pairwise_distillation(student, teacher, pool_size=view.settings.skd_pool_size)


# SKD's pair-wise term on `embed`, unadapted: cosine affinities do not depend on the channels.
PAIRWISE = Term(_pairwise_term, feature="embed", adapted=False)
