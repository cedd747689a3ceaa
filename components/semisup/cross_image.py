"""Cross-image distillation between labeled and unlabeled images: relation and style.

Zhang et al. (2024) publish only the idea: a *relation distillation module* that models
inter-channel correlations between features of labeled and unlabeled samples, and a *style
distillation strategy* that aligns the feature distributions of labeled and unlabeled data. The
formulas below are our reconstruction (METHODS.md §3, docs/methods.md), not the authors' code.

Relation. Features Z (B, C, h, w); every channel is L2-normalised over its h·w positions
(Ẑ). For a labeled/unlabeled pair (l, u) the inter-channel relation is the C×C matrix

    R(l, u) = softmax_row(Ẑ_l Ẑ_uᵀ / τ),    Ẑ_l, Ẑ_u ∈ R^{C × hw}.

The EMA teacher's R (on the labeled image and the *weak* unlabeled view) is the target of the
student's R (same labeled image, *strong* unlabeled view):  L_rel = mean_{pairs, rows}
KL(R_t ‖ R_s).

Scale: CIRKDv2's channel relation (winycg/CIRKD@dab64db losses/cirkd_channel.py L111-126: rows
of L2-normalised channels, `F.kl_div(log_softmax(S/τ), softmax(T/τ), reduction='batchmean')`,
i.e. the row-KL summed and divided by the C rows, averaged over the B² image pairs) has no τ²
factor, and neither has CIRKD's pixel relation (losses/cirkd_mini_batch.py L82-87); its τ is
`--contrast-temperature` 0.1 (train_cirkdv2.py L86) at weight `--lambda-minibatch-channel` 1
(L92; every scripts/train_cirkdv2/*.sh). τ² appears there only on the memory terms, at their
own temperature `--contrast-kd-temperature` 1 (cirkd_channel.py L92, cirkd_memory.py L116), where
it is 1. So L_rel here is CIRKDv2's per-pair value without τ², and a weight means what
`lambda_minibatch_channel` means there. Until issue 21 (item 10) this loss carried τ² (0.01 at
τ = 0.1), so the method's row weight 0.01 (components/regimes.py) trains exactly as the former
weight 1 did; CIRKDv2's own weight is 1.

Style. Per-channel mean and standard deviation over space (AdaIN statistics) of the student's
unlabeled features are pulled (MSE) to those of the labeled features: the labeled batch's mean
statistics (detached), or an EMA memory of them (`StyleMemory`), which is steadier with small
batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def channel_normalize(z: Tensor, eps: float = 1e-12) -> Tensor:
    """(B, C, h, w) -> (B, C, h·w), each channel L2-normalised over its positions (float32)."""
    flat = z.float().flatten(2)
    return F.normalize(flat, dim=2, eps=eps)


def relation_logits(z_l: Tensor, z_u: Tensor, temperature: float) -> Tensor:
    """(P, C, h, w) x (P, C, h, w) -> (P, C, C): Ẑ_l Ẑ_uᵀ / τ for P index-aligned pairs."""
    if z_l.shape != z_u.shape:
        raise ValueError(
            f"relation needs equal feature shapes, got {tuple(z_l.shape)} and {tuple(z_u.shape)}"
        )
    return torch.bmm(channel_normalize(z_l), channel_normalize(z_u).transpose(1, 2)) / temperature


def relation_matrix(z_l: Tensor, z_u: Tensor, temperature: float) -> Tensor:
    """R(l, u): the row-softmax of `relation_logits`; each of the C rows sums to one."""
    return relation_logits(z_l, z_u, temperature).softmax(dim=-1)


def relation_loss(
    teacher_l: Tensor, teacher_u: Tensor, student_l: Tensor, student_u: Tensor, temperature: float
) -> Tensor:
    """Mean over pairs and rows of KL(R_t ‖ R_s), without a τ² factor (CIRKDv2's scale: module
    docstring); gradients reach only the student features.

    All four are (P, C, h, w) with pair k = (labeled k, unlabeled k). Zero when the student's
    relations equal the teacher's, positive otherwise.
    """
    with torch.no_grad():
        log_t = relation_logits(teacher_l, teacher_u, temperature).log_softmax(dim=-1)
    log_s = relation_logits(student_l, student_u, temperature).log_softmax(dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=-1)  # (P, C)
    return kl.mean()


def style_statistics(z: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """(B, C, h, w) -> per-image, per-channel mean and std over space, each (B, C) (float32)."""
    flat = z.float().flatten(2)
    mean = flat.mean(dim=2)
    std = (flat.var(dim=2, unbiased=False) + eps).sqrt()
    return mean, std


def style_loss(z_u: Tensor, target_mean: Tensor, target_std: Tensor) -> Tensor:
    """MSE of the unlabeled features' statistics to the target (C,) mean and std.

    Zero when every unlabeled image's channel statistics equal the target's.
    """
    mean, std = style_statistics(z_u)
    return F.mse_loss(mean, target_mean.expand_as(mean)) + F.mse_loss(
        std, target_std.expand_as(std)
    )


class StyleMemory:
    """An EMA of the labeled batches' mean channel statistics (the style loss's target)."""

    def __init__(self, momentum: float):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"style memory momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.mean: Tensor | None = None
        self.std: Tensor | None = None

    @torch.no_grad()
    def update(self, mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
        """Fold in a batch's (C,) statistics; returns the memory (the batch's on first use)."""
        mean, std = mean.detach().float(), std.detach().float()
        if self.mean is None or self.mean.shape != mean.shape:
            self.mean, self.std = mean.clone(), std.clone()
        else:
            self.mean.mul_(self.momentum).add_(mean, alpha=1 - self.momentum)
            self.std.mul_(self.momentum).add_(std, alpha=1 - self.momentum)
        return self.mean, self.std

    def state_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.std = state.get("mean"), state.get("std")

    def to(self, device: torch.device) -> StyleMemory:
        if self.mean is not None:
            self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self


__all__ = [
    "StyleMemory",
    "channel_normalize",
    "relation_logits",
    "relation_loss",
    "relation_matrix",
    "style_loss",
    "style_statistics",
]
