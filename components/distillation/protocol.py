"""The method protocol: what the training loop needs from a distillation (or plain) method.

A method owns the student, any trainable adapters and, when it has one, the frozen teacher.

- `trainable`: the one module that is optimised and wrapped by DDP (the student plus adapters).
  The loop may replace it with its DDP wrapper; methods call it, never `self.student` directly,
  in `training_step`, so gradients are synchronised.
- `training_step(batch)`: batch has `image` (B,3,H,W) float and `mask` (B,H,W) int64 (255 =
  ignore). Returns `loss` (the total to back-propagate) and every named term, detached or not.
- `eval_model()`: the student, unwrapped, for evaluation and export.
- `extra_state()` / `load_extra_state()`: state outside `trainable` that must survive a resume
  (a critic's optimizer, memory banks, an EMA teacher). Empty for the simple methods.
- `after_step()` (optional): called by the loop after every optimizer step (the semi-supervised
  methods update their EMA teacher there).

Semi-supervised methods (components/semisup/method.py) also get the unlabeled batch in the same
dict, its keys prefixed `u_`: `u_image` (weak view), `u_image_strong`, `u_area` (False on crop
padding), `u_valid`, and `u_mask` (diagnostics only).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Method(Protocol):
    trainable: nn.Module

    def training_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]: ...

    def eval_model(self) -> nn.Module: ...

    def extra_state(self) -> dict: ...

    def load_extra_state(self, state: dict) -> None: ...

    def to(self, device: torch.device) -> Method: ...


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return module.module if hasattr(module, "module") else module


def segmentation_ce(logits: Tensor, mask: Tensor, ignore_index: int = 255) -> Tensor:
    """Pixel-wise cross-entropy with logits upsampled (bilinear) to the mask's size.

    logits: (B,K,h,w); mask: (B,H,W) int64. A batch whose pixels are all ignore gives 0 with a
    gradient path (not NaN), so an all-bad batch cannot poison the weights.
    """
    if logits.shape[-2:] != mask.shape[-2:]:
        logits = F.interpolate(logits, size=mask.shape[-2:], mode="bilinear", align_corners=False)
    valid = mask != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), mask, ignore_index=ignore_index)


def supervised_terms(
    out: dict, mask: Tensor, ce_weight: float, aux_weight: float, ignore_index: int = 255
) -> dict[str, Tensor]:
    """CE on the main logits and (when the model has an aux head) weighted aux CE."""
    terms = {"ce": ce_weight * segmentation_ce(out["logits"], mask, ignore_index)}
    if "aux_logits" in out and aux_weight > 0:
        terms["aux"] = aux_weight * segmentation_ce(out["aux_logits"], mask, ignore_index)
    return terms
