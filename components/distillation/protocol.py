"""What the training loop needs from a method (any regime), and the defaults every method shares.

A method owns the student, any trainable adapters and, when it has one, the frozen teacher.
`MethodBase` (as timm's TrainingTask) gives every method:

- `trainable`: the one module that is optimised and wrapped by DDP (the student plus adapters).
  The loop may replace it with its DDP wrapper; methods call it, never the bare student, in
  `training_step`, so gradients are synchronised.
- `training_step(batch)` (each method's own): batch has `image` (B,3,H,W) float and `mask`
  (B,H,W) int64 (255 = ignore), plus what the regime's streams add (`components/regimes.py`).
  Returns `loss` (the total to back-propagate) and every named term, detached or not.
- `eval_model()`: the student, unwrapped, for evaluation and export.
- `extra_state()` / `load_extra_state()`: state outside `trainable` that must survive a resume
  (a critic's optimizer, memory banks, an EMA teacher). Empty by default.
- `after_step()`: called by the training core after every optimizer step (the semi-supervised
  methods update their EMA teacher there). Nothing by default.
- `to(device)`: moves everything `parts()` lists (by default `trainable`).
- `panel_maps(images, masks)`: extra label maps for TensorBoard's val panels (none by default).

Semi-supervised methods (components/semisup/method.py) also get the unlabeled batch in the same
dict, its keys prefixed `u_`: `u_image` (weak view), `u_image_strong`, `u_area` (False on crop
padding), `u_valid`, and `u_mask` (diagnostics only).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MethodBase(ABC):
    """Defaults of the method contract (module docstring); subclasses set `trainable` and
    write `training_step`."""

    trainable: nn.Module

    @abstractmethod
    def training_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The step's terms: `loss` (to back-propagate) and every named term."""

    def eval_model(self) -> nn.Module:
        return unwrap(self.trainable)

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def after_step(self) -> None:
        pass

    def panel_maps(self, images: Tensor, masks: Tensor) -> dict[str, Tensor]:
        """Label maps (B,H,W) of the method's own, shown beside the predictions in TensorBoard's
        val panels (pseudo labels, CAMs). `masks` are the images' ground truth, for maps that
        need the image-level classes. None by default."""
        return {}

    def parts(self) -> list:
        """Everything `to` moves: modules, and objects with a `to` of their own."""
        return [self.trainable]

    def to(self, device: torch.device):
        for part in self.parts():
            part.to(device)
        return self


Method = MethodBase


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
