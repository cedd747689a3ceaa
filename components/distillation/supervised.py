"""`method: none` — plain supervised training (the teacher, and the student baseline)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from components.distillation.protocol import supervised_terms, unwrap


class Supervised:
    """CE (+ aux CE) on the labels; no teacher."""

    def __init__(self, student: nn.Module, ce_weight: float = 1.0, aux_weight: float = 0.4):
        self.trainable: nn.Module = student
        self.ce_weight = ce_weight
        self.aux_weight = aux_weight

    def training_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = self.trainable(batch["image"])
        terms = supervised_terms(out, batch["mask"], self.ce_weight, self.aux_weight)
        terms["loss"] = sum(terms.values())
        return terms

    def eval_model(self) -> nn.Module:
        return unwrap(self.trainable)

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def to(self, device: torch.device) -> Supervised:
        self.trainable.to(device)
        return self
