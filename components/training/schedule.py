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


def build_optimizer(module: torch.nn.Module, optim) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW on `module`'s trainable parameters, from an `OptimConfig`.

    With `head_lr_mult` != 1 there are two groups: the backbone's parameters (any name with a
    `backbone` component, e.g. `backbone.block1.0.attn.q.weight` or, inside a wrapper,
    `net.backbone....`) at `lr`, everything else (heads, classifier, adapters) at
    `lr * head_lr_mult`, as in TSCD/AFA (6e-5 / 6e-4). The schedule scales both alike.
    """
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if optim.head_lr_mult == 1.0:
        groups: list[dict] = [{"params": [p for _, p in params], "lr": optim.lr}]
    else:
        backbone = [p for n, p in params if "backbone" in n.split(".")]
        heads = [p for n, p in params if "backbone" not in n.split(".")]
        groups = [
            {"params": backbone, "lr": optim.lr},
            {"params": heads, "lr": optim.lr * optim.head_lr_mult},
        ]
    match optim.name:
        case "sgd":
            return torch.optim.SGD(
                groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay
            )
        case "adamw":
            return torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay)
        case _:
            raise ValueError(f"'optim.name': unknown optimizer '{optim.name}' (sgd or adamw)")
