"""Learning rate as a function of the iteration (linear warm-up, then poly decay), and the
optimizer.

    optimizer = build_optimizer(method.trainable, cfg.optim)
    schedule = Schedule.of(optimizer, total_iters, cfg.optim)
    schedule.apply(optimizer, iteration)    # before each step: lr = base lr x factor(iteration)

Nothing about the schedule is state: the iteration alone sets the rate, so a resumed run only
needs its iteration (and a longer run, more epochs, just has a later horizon).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def lr_factor(iteration: int, total_iters: int, power: float, warmup_iters: int = 0) -> float:
    """(i+1)/warmup during the warm-up, then (1 - i/total)^power (0 past the horizon)."""
    if iteration < warmup_iters:
        return (iteration + 1) / warmup_iters
    return max(0.0, 1.0 - iteration / max(1, total_iters)) ** power


@dataclass
class Schedule:
    """Each parameter group's base lr, scaled by `lr_factor` of the iteration."""

    base_lrs: list[float]
    total_iters: int
    power: float
    warmup_iters: int = 0

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer, total_iters: int, optim) -> Schedule:
        """From an optimizer and an OptimConfig. The base lrs are the groups' `initial_lr`
        (set by `build_optimizer`, kept in its state_dict), else their current lr."""
        base = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
        return cls(base, total_iters, optim.poly_power, optim.warmup_iters)

    def factor(self, iteration: int) -> float:
        return lr_factor(iteration, self.total_iters, self.power, self.warmup_iters)

    def apply(self, optimizer: torch.optim.Optimizer, iteration: int) -> None:
        f = self.factor(iteration)
        for group, base in zip(optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * f


def _is_backbone(name: str) -> bool:
    return "backbone" in name.split(".")


def is_backbone_norm(name: str) -> bool:
    """A backbone parameter whose name contains "norm": AFA's and TSCD's rule for the encoder's
    LayerNorms (rulixiang/afa wetr/model_attn_aff.py, WeTr.get_param_groups: `if "norm" in
    name` over `self.encoder.named_parameters()`), e.g. `backbone.patch_embed1.norm.weight`,
    `backbone.block1.0.norm1.bias`, `backbone.block1.0.attn.norm.weight`, `backbone.norm4.bias`.
    """
    return _is_backbone(name) and "norm" in name


def build_optimizer(module: torch.nn.Module, optim) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW on `module`'s trainable parameters, from an `OptimConfig`.

    With `head_lr_mult` != 1 there are two groups: the backbone's parameters (any name with a
    `backbone` component, e.g. `backbone.block1.0.attn.q.weight` or, inside a wrapper,
    `net.backbone....`) at `lr`, everything else (heads, classifier, adapters) at
    `lr * head_lr_mult`, as in TSCD/AFA (6e-5 / 6e-4). The schedule scales both alike.

    When the module (or the module a DDP wrapper holds) has `zero_lr_backbone_norms = True`
    (the weakly supervised methods set it from `method.weakly.freeze_backbone_norms`), the
    backbone's norm parameters (`is_backbone_norm`) form one more group, last, at lr 0 and
    weight decay 0: AFA and TSCD freeze the encoder's LayerNorms this way (rulixiang/afa
    scripts/dist_train_voc.py, train(): the param_groups[1] entry `"lr": 0.0, ## freeze norm
    layers` with `"weight_decay": 0.0`). lr 0 times any schedule factor stays 0.
    """
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    owner = getattr(module, "module", module)  # DDP keeps the wrapped module here
    frozen: list[torch.nn.Parameter] = []
    if getattr(owner, "zero_lr_backbone_norms", False):
        frozen = [p for n, p in params if is_backbone_norm(n)]
        params = [(n, p) for n, p in params if not is_backbone_norm(n)]
    if optim.head_lr_mult == 1.0:
        groups: list[dict] = [{"params": [p for _, p in params], "lr": optim.lr}]
    else:
        backbone = [p for n, p in params if _is_backbone(n)]
        heads = [p for n, p in params if not _is_backbone(n)]
        groups = [
            {"params": backbone, "lr": optim.lr},
            {"params": heads, "lr": optim.lr * optim.head_lr_mult},
        ]
    if frozen:
        groups.append({"params": frozen, "lr": 0.0, "weight_decay": 0.0})
    for group in groups:
        group["initial_lr"] = group["lr"]  # the base of the schedule; saved with the optimizer
    match optim.name:
        case "sgd":
            return torch.optim.SGD(
                groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay
            )
        case "adamw":
            return torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay)
        case _:
            raise ValueError(f"'optim.name': unknown optimizer '{optim.name}' (sgd or adamw)")
