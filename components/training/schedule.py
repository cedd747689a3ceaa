"""Learning-rate schedule: linear warm-up then poly decay, per iteration."""

from __future__ import annotations

import torch


class PolyFactor:
    """lr multiplier at iteration i: i/warmup during warm-up, then (1 - i/total)^power.

    A class (not a lambda) so LambdaLR can save it in state_dict.
    """

    def __init__(self, total_iters: int, power: float = 0.9, warmup_iters: int = 0):
        self.total_iters, self.power, self.warmup_iters = total_iters, power, warmup_iters

    def __call__(self, i: int) -> float:
        if i < self.warmup_iters:
            return (i + 1) / self.warmup_iters
        return max(0.0, 1.0 - i / max(1, self.total_iters)) ** self.power


def poly_scheduler(
    optimizer: torch.optim.Optimizer, total_iters: int, power: float, warmup_iters: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, PolyFactor(total_iters, power, warmup_iters)
    )
