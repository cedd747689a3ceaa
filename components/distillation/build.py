"""Build the method of a config: its regime's builder (`components/regimes.py`).

method = build_method(cfg, student, teacher, num_classes=k)
"""

from __future__ import annotations

import torch
from torch import nn

from components.config import Config
from components.distillation.protocol import MethodBase
from components.regimes import regime_of


def build_method(
    cfg: Config,
    student: nn.Module,
    teacher: nn.Module | None = None,
    num_classes: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    ignore_index: int = 255,
) -> MethodBase:
    return regime_of(cfg.method.name).build_method(
        cfg,
        student,
        teacher,
        num_classes=num_classes,
        autocast_dtype=autocast_dtype,
        ignore_index=ignore_index,
    )
