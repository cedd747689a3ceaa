"""Pixel-wise logit distillation (Hinton et al. 2015, applied per pixel as in SKD/CIRKD)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.distillation.protocol import supervised_terms, unwrap


def pixel_kd(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean over pixels of T^2 * KL(softmax(teacher/T) || softmax(student/T)) over classes.

    student, teacher: (B,K,h,w) logits. When their spatial sizes differ the student's logits are
    resized (bilinear) to the teacher's — never cropped. Returns a scalar.
    """
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"student logits {tuple(student.shape)} and teacher {tuple(teacher.shape)} need the "
            "same batch size and class count"
        )
    if student.shape[-2:] != teacher.shape[-2:]:
        student = F.interpolate(
            student, size=teacher.shape[-2:], mode="bilinear", align_corners=False
        )
    t = temperature
    log_p_s = F.log_softmax(student.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher.float() / t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)  # (B,h,w)
    return kl.mean() * t * t


class LogitKD:
    """CE (+ aux CE) + λ_pi · pixel_kd(student, frozen teacher)."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 1.0,
        ce_weight: float = 1.0,
        aux_weight: float = 0.4,
        kd_weight: float = 1.0,
        autocast_dtype: torch.dtype | None = None,
    ):
        self.trainable: nn.Module = student
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature = temperature
        self.ce_weight, self.aux_weight, self.kd_weight = ce_weight, aux_weight, kd_weight
        self.autocast_dtype = autocast_dtype

    def teacher_forward(self, images: Tensor) -> dict:
        with torch.inference_mode():
            if self.autocast_dtype is not None:
                with torch.autocast(images.device.type, dtype=self.autocast_dtype):
                    out = self.teacher(images)
            else:
                out = self.teacher(images)
        # inference tensors cannot enter autograd graphs; a clone is an ordinary tensor.
        return {"logits": out["logits"].float().clone()}

    def training_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        teacher_out = self.teacher_forward(batch["image"])
        out = self.trainable(batch["image"])
        terms = supervised_terms(out, batch["mask"], self.ce_weight, self.aux_weight)
        terms["kd"] = self.kd_weight * pixel_kd(
            out["logits"], teacher_out["logits"], self.temperature
        )
        terms["loss"] = sum(terms.values())
        return terms

    def eval_model(self) -> nn.Module:
        return unwrap(self.trainable)

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def to(self, device: torch.device) -> LogitKD:
        self.trainable.to(device)
        self.teacher.to(device)
        return self
