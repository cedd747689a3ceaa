"""A student trained against a frozen teacher with any weighted set of distillation terms.

Every supervised method of the papers is a combination of the same terms (METHODS.md §1):

    kd           CE (+aux) + pi
    cwd          CE (+aux) + cwd_feat + cwd_logit
    skd          CE (+aux) + pi + skd + adv
    adversarial  CE (+aux) + adv
    cirkd        CE (+aux) + pi + batch_pixel + memory_pixel + memory_region
    sstkd        CE (+aux) + pi + adv + str + sta

`build_method` picks the set and the published weights; a weight of 0 removes a term (ablations
such as "structural only" are `method.weights.sta=0`). `trainable` is the student plus the 1x1
adapters that project its features to the teacher's channels (the one module DDP wraps, as in
timm's distillation task); the critic and memory banks are method state, checkpointed through
`extra_state`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from components.config import MethodConfig
from components.distillation.adversarial import HolisticDistillation
from components.distillation.cirkd import MemoryBank, memory_contrast_loss, minibatch_pixel_relation
from components.distillation.contourlet import structural_texture_loss
from components.distillation.cwd import channel_wise_distillation
from components.distillation.logits import pixel_kd
from components.distillation.protocol import supervised_terms, unwrap
from components.distillation.skd import pairwise_distillation
from components.distillation.texture import statistical_texture_loss

TERMS = (
    "pi",
    "cwd_logit",
    "cwd_feat",
    "skd",
    "adv",
    "batch_pixel",
    "memory_pixel",
    "memory_region",
    "str",
    "sta",
)
# The feature each feature-level term compares. All but SKD's (cosine affinities, free of the
# channel count) see the student's map through an adapter to the teacher's channels.
_FEATURE_OF = {
    "cwd_feat": "embed",
    "skd": "embed",
    "batch_pixel": "embed",
    "memory_pixel": "embed",
    "memory_region": "embed",
    "str": "low",
    "sta": "low",
}
_UNADAPTED = {"skd"}


def conv_bn_adapter(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 conv + BN: the student's map in the teacher's channel count (SSTKD's adapter)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
    )


class StudentWithAdapters(nn.Module):
    """The student's forward plus `out["adapted"][name]` for each adapted feature."""

    def __init__(self, student: nn.Module, adapters: dict[str, nn.Module]):
        super().__init__()
        self.student = student
        self.adapters = nn.ModuleDict(adapters)

    def forward(self, images: Tensor) -> dict:
        out = self.student(images)
        out["adapted"] = {k: m(out["features"][k]) for k, m in self.adapters.items()}
        return out


def _model_name(model: nn.Module) -> str:
    return getattr(model, "name", type(model).__name__)


class Distiller:
    """CE (+ aux CE) + Σ weight · term(student, frozen teacher) over the terms in `weights`."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        weights: dict[str, float],
        settings: MethodConfig,
        num_classes: int,
        ce_weight: float = 1.0,
        aux_weight: float = 0.4,
        autocast_dtype: torch.dtype | None = None,
    ):
        unknown = sorted(set(weights) - set(TERMS))
        if unknown:
            raise ValueError(f"unknown distillation terms {unknown}; known: {TERMS}")
        self.weights = {k: float(w) for k, w in weights.items() if w > 0}
        self.settings = settings
        self.teacher = teacher.eval().requires_grad_(False)
        self.ce_weight, self.aux_weight = ce_weight, aux_weight
        self.autocast_dtype = autocast_dtype
        self.teacher_features = sorted({_FEATURE_OF[k] for k in self.weights if k in _FEATURE_OF})
        s_ch = getattr(student, "feature_channels", {})
        t_ch = getattr(teacher, "feature_channels", {})
        adapters = {}
        for name in self.teacher_features:
            users = [k for k in self.weights if _FEATURE_OF.get(k) == name]
            for role, model, channels in (("teacher", teacher, t_ch), ("student", student, s_ch)):
                if name not in channels:
                    raise ValueError(
                        f"{role} model '{_model_name(model)}' has no '{name}' feature, which "
                        f"the terms {users} need (its features: {sorted(channels)})"
                    )
            if any(k not in _UNADAPTED for k in users):
                adapters[name] = conv_bn_adapter(s_ch[name], t_ch[name])
        self.trainable: nn.Module = StudentWithAdapters(student, adapters)
        self.holistic = None
        if "adv" in self.weights:
            a = settings.adversarial
            self.holistic = HolisticDistillation(
                num_classes,
                a.critic_width,
                a.critic_lr,
                a.gradient_penalty,
                settings.weights.critic,
            )
        self.bank = None
        if "memory_pixel" in self.weights or "memory_region" in self.weights:
            c = settings.cirkd
            self.bank = MemoryBank(
                num_classes,
                t_ch["embed"],
                pixel_size=c.pixel_memory_size,
                region_size=c.region_memory_size,
                pixels_per_class_per_image=c.pixels_per_class,
            )

    def teacher_forward(self, images: Tensor) -> dict[str, Tensor]:
        """The frozen teacher's logits and the features the terms need, as ordinary tensors."""
        with torch.inference_mode():
            if self.autocast_dtype is not None:
                with torch.autocast(images.device.type, dtype=self.autocast_dtype):
                    out = self.teacher(images)
            else:
                out = self.teacher(images)
        # Inference tensors cannot enter autograd graphs; a clone is an ordinary tensor.
        result = {"logits": out["logits"].float().clone()}
        for name in self.teacher_features:
            if name not in out["features"]:
                raise ValueError(
                    f"teacher model '{_model_name(self.teacher)}' returned no '{name}' feature"
                )
            result[name] = out["features"][name].float().clone()
        return result

    def training_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        images, mask = batch["image"], batch["mask"]
        t = self.teacher_forward(images)
        out = self.trainable(images)
        terms = supervised_terms(out, mask, self.ce_weight, self.aux_weight)
        w, s, logits = self.weights, self.settings, out["logits"]
        adapted = out["adapted"]
        if "pi" in w:
            terms["pi"] = w["pi"] * pixel_kd(logits, t["logits"], s.temperature)
        if "cwd_logit" in w:
            cwd = channel_wise_distillation(logits, t["logits"], s.cwd_temperature)
            terms["cwd_logit"] = w["cwd_logit"] * cwd
        if "cwd_feat" in w:
            cwd = channel_wise_distillation(adapted["embed"], t["embed"], s.cwd_temperature)
            terms["cwd_feat"] = w["cwd_feat"] * cwd
        if "skd" in w:
            pair = pairwise_distillation(
                out["features"]["embed"], t["embed"], pool_size=s.skd_pool_size
            )
            terms["skd"] = w["skd"] * pair
        if "batch_pixel" in w:
            rel = minibatch_pixel_relation(adapted["embed"], t["embed"], s.cirkd.batch_temperature)
            terms["batch_pixel"] = w["batch_pixel"] * rel
        if self.bank is not None:
            # As in CIRKD's code: the batch's teacher embeddings join the memory first.
            self.bank.enqueue(t["embed"], mask)
            pixel, region = memory_contrast_loss(
                adapted["embed"],
                t["embed"],
                self.bank,
                tau=s.cirkd.memory_temperature,
                num_anchors=s.cirkd.num_anchors,
                labels=mask,
            )
            for name, value in (("memory_pixel", pixel), ("memory_region", region)):
                if name in w:
                    terms[name] = w[name] * value
        if "str" in w:
            c = s.cdm
            structural = structural_texture_loss(adapted["low"], t["low"], c.levels, c.directions)
            terms["str"] = w["str"] * structural
        if "sta" in w:
            d = s.dtiem
            statistical = statistical_texture_loss(
                adapted["low"], t["low"], d.levels, d.iterations, d.clip
            )
            terms["sta"] = w["sta"] * statistical
        logged = {}
        if self.holistic is not None:
            logged["critic"] = self.holistic.critic_step(images, logits, t["logits"])
            terms["adv"] = w["adv"] * self.holistic.student_loss(images, logits)
        terms["loss"] = sum(terms.values())
        return {**terms, **logged}

    def eval_model(self) -> nn.Module:
        return unwrap(self.trainable).student

    def extra_state(self) -> dict:
        state = {}
        if self.holistic is not None:
            state["holistic"] = self.holistic.state_dict()
        if self.bank is not None:
            state["memory_bank"] = self.bank.state_dict()
        return state

    def load_extra_state(self, state: dict) -> None:
        for key, part in (("holistic", self.holistic), ("memory_bank", self.bank)):
            if part is None:
                continue
            if key not in state:
                raise KeyError(
                    f"the checkpoint has no '{key}' state, which this method needs; it was "
                    "written by a run with other distillation terms"
                )
            part.load_state_dict(state[key])

    def to(self, device: torch.device) -> Distiller:
        self.trainable.to(device)
        self.teacher.to(device)
        if self.holistic is not None:
            self.holistic.to(device)
        if self.bank is not None:
            self.bank.to(device)
        return self
