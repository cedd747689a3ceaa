"""The mean teacher: an exponential moving average (EMA) of the student's weights.

    teacher = EMATeacher(student, momentum=0.999)
    ...optimizer.step()
    teacher.update(student)          # after every optimizer step

Tarvainen & Valpola, "Mean teachers are better role models" (NeurIPS 2017). With momentum m and
the update count t (starting at 0), every floating-point parameter *and buffer* (BatchNorm running
mean/var) follows

    θ_teacher ← α·θ_teacher + (1 − α)·θ_student,    α = min(m, 1 − 1/(t + 1)),

so the first updates track the student closely (α = 0, 0.5, 0.67, ...) instead of averaging in
the random initialisation for ~1/(1−m) steps. Integer buffers (BatchNorm's
`num_batches_tracked`) are copied. The teacher is always in eval mode, never trained, and its
state (weights and update count) is part of the checkpoint.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_factor(momentum: float, updates: int) -> float:
    """α for the update number `updates` (0-based): min(momentum, 1 − 1/(updates + 1))."""
    return min(momentum, 1.0 - 1.0 / (updates + 1))


class EMATeacher:
    """A frozen copy of the student whose weights and buffers are an EMA of the student's."""

    def __init__(self, student: nn.Module, momentum: float = 0.999):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1), got {momentum}")
        self.model = copy.deepcopy(student).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.momentum = momentum
        self.updates = 0

    @torch.no_grad()
    def update(self, student: nn.Module) -> float:
        """One EMA step towards `student` (unwrapped); returns the α used."""
        alpha = ema_factor(self.momentum, self.updates)
        t_state = self.model.state_dict()
        for name, s_value in student.state_dict().items():
            t_value = t_state[name]
            if t_value.dtype.is_floating_point:
                t_value.mul_(alpha).add_(s_value.detach().to(t_value.dtype), alpha=1.0 - alpha)
            else:
                t_value.copy_(s_value)
        self.updates += 1
        return alpha

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])

    def to(self, device: torch.device) -> EMATeacher:
        self.model.to(device)
        return self


__all__ = ["EMATeacher", "ema_factor"]
