"""Build a method from the config: a `match` on `method.name`, no registry."""

from __future__ import annotations

import torch
from torch import nn

from components.config import Config
from components.distillation.logits import LogitKD
from components.distillation.protocol import Method
from components.distillation.supervised import Supervised


def needs_teacher(name: str) -> bool:
    return name != "none"


def build_method(
    cfg: Config,
    student: nn.Module,
    teacher: nn.Module | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> Method:
    m, w = cfg.method, cfg.method.weights
    if needs_teacher(m.name) and teacher is None:
        raise ValueError(f"method '{m.name}' needs a teacher model")
    match m.name:
        case "none":
            return Supervised(student, ce_weight=w.ce, aux_weight=w.aux)
        case "kd":
            return LogitKD(
                student,
                teacher,
                temperature=m.temperature,
                ce_weight=w.ce,
                aux_weight=w.aux,
                kd_weight=w.pi,
                autocast_dtype=autocast_dtype,
            )
        case _:
            raise ValueError(f"'method.name': unknown method '{m.name}'")
