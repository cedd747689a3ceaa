"""A supervised distillation term as a value: what it reads and how it is computed.

    PIXEL_KD = Term(lambda s, t, view, state: pixel_kd(s, t, view.settings.temperature))
    STRUCTURAL = Term(compute=..., feature="low")          # through a 1x1 conv + BN adapter

Each loss file defines the `Term` of its loss next to the loss function; `terms.py` lists them
in one table (name -> Term) and the methods as rows of (term -> published weight). The
distiller (`distiller.py`) only walks the table: for each weighted term it hands `compute` the
student's and the teacher's tensors the term reads, the step's `StepView`, and the term's state.

- `feature`: None reads the logits (B,K,h,w); "embed" or "low" reads that feature map of both
  models (`models/build.py`'s forward contract).
- `adapted`: the student's feature goes through a 1x1 conv + BN adapter to the teacher's channel
  count first (trained with the student, the one module DDP wraps). Ignored for logits.
- `state`: a factory `state(settings, num_classes, teacher_channels) -> TermState` for terms
  that keep something across steps (a critic and its optimizer, a memory bank). Terms with the
  same `state_key` share one instance; it is checkpointed under that key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor


@dataclass
class StepView:
    """What every term can see in one step besides its own two tensors."""

    images: Tensor  # (B,3,H,W)
    mask: Tensor  # (B,H,W) int64, 255 = ignore
    settings: Any  # the run's MethodConfig (temperatures, cdm, dtiem, cirkd, adversarial)
    # The student's own channels per feature, before any adapter (CWD normalises by them, as
    # CIRKD's CriterionCWD does); None where unknown.
    student_channels: dict[str, int] | None = None


class TermState(Protocol):
    """State a term keeps across steps (checkpointed through `state_dict`)."""

    def prepare(self, student: Tensor, teacher: Tensor, view: StepView) -> dict[str, Tensor]:
        """Once per step, before the terms that share this state; returns logged diagnostics."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def to(self, device: torch.device) -> Any: ...


@dataclass(frozen=True)
class Term:
    """compute(student, teacher, view, state) -> unweighted scalar loss."""

    compute: Callable[[Tensor, Tensor, StepView, Any], Tensor]
    feature: str | None = None
    adapted: bool = True
    state: Callable[[Any, int, int], TermState] | None = None
    state_key: str | None = None

    def __post_init__(self) -> None:
        if self.state is not None and self.state_key is None:
            raise ValueError("a Term with state needs a state_key (its checkpoint key)")
