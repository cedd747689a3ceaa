"""A student trained on its labels and, with a frozen teacher, any weighted set of terms.

Every supervised method is a row of `terms.METHODS` (a set of terms from `terms.TERMS` with
their published weights); `method.name=none` is the row with no term and trains the student
alone (the teacher itself, and the student baseline). `trainable` is the student plus the 1x1
adapters that project its features to the teacher's channels (the one module DDP wraps, as in
timm's distillation task); a term's state (a critic, memory banks) is method state,
checkpointed through `extra_state` under the term's `state_key`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from components.distillation.protocol import MethodBase, supervised_terms, unwrap
from components.distillation.term import StepView, Term
from components.schema import MethodConfig


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


class Distiller(MethodBase):
    """CE (+ aux CE) + Σ weight · term(student, frozen teacher) over the weighted terms.

    `terms` maps each term's name to its `Term` (normally `terms.TERMS`); `weights` names the
    terms of this run with their weights (`terms.method_terms`); a weight of 0 skips a term.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        weights: dict[str, float],
        settings: MethodConfig,
        num_classes: int,
        terms: dict[str, Term],
        ce_weight: float = 1.0,
        aux_weight: float = 0.4,
        autocast_dtype: torch.dtype | None = None,
    ):
        unknown = sorted(set(weights) - set(terms))
        if unknown:
            raise ValueError(f"unknown distillation terms {unknown}; known: {list(terms)}")
        self.weights = {k: float(w) for k, w in weights.items() if w > 0}
        self.terms = {k: terms[k] for k in self.weights}
        if self.terms and teacher is None:
            raise ValueError(f"the terms {list(self.terms)} need a teacher model")
        self.settings = settings
        self.teacher = None if teacher is None else teacher.eval().requires_grad_(False)
        self.ce_weight, self.aux_weight = ce_weight, aux_weight
        self.autocast_dtype = autocast_dtype
        self.features = sorted({t.feature for t in self.terms.values() if t.feature is not None})
        adapters = self._adapters(student, self.teacher) if self.terms else {}
        # With a teacher, the student is wrapped even without adapters: checkpoints keep one
        # key layout (`student.` ...) for every distillation method.
        self.trainable: nn.Module = (
            student if teacher is None else StudentWithAdapters(student, adapters)
        )
        t_ch = getattr(teacher, "feature_channels", {})
        self.student_channels = dict(getattr(student, "feature_channels", {}))
        self.states: dict[str, object] = {}
        for term in self.terms.values():
            if term.state is not None and term.state_key not in self.states:
                channels = t_ch.get(term.feature, 0) if term.feature else 0
                self.states[term.state_key] = term.state(settings, num_classes, channels)

    def _adapters(self, student: nn.Module, teacher: nn.Module) -> dict[str, nn.Module]:
        """A 1x1 conv + BN per feature that an adapted term reads; checks both models have it."""
        s_ch = getattr(student, "feature_channels", {})
        t_ch = getattr(teacher, "feature_channels", {})
        adapters = {}
        for name in self.features:
            users = [k for k, t in self.terms.items() if t.feature == name]
            for role, model, channels in (("teacher", teacher, t_ch), ("student", student, s_ch)):
                if name not in channels:
                    raise ValueError(
                        f"{role} model '{_model_name(model)}' has no '{name}' feature, which "
                        f"the terms {users} need (its features: {sorted(channels)})"
                    )
            if any(self.terms[k].adapted for k in users):
                adapters[name] = conv_bn_adapter(s_ch[name], t_ch[name])
        return adapters

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
        for name in self.features:
            if name not in out["features"]:
                raise ValueError(
                    f"teacher model '{_model_name(self.teacher)}' returned no '{name}' feature"
                )
            result[name] = out["features"][name].float().clone()
        return result

    def training_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        images, mask = batch["image"], batch["mask"]
        teacher = self.teacher_forward(images) if self.terms else {}
        out = self.trainable(images)
        terms = supervised_terms(out, mask, self.ce_weight, self.aux_weight)
        view = StepView(images, mask, self.settings, self.student_channels)
        logged: dict[str, Tensor] = {}
        prepared: set[str] = set()
        for name, term in self.terms.items():
            s, t = self._inputs(term, out, teacher)
            state = self.states.get(term.state_key) if term.state_key else None
            if state is not None and term.state_key not in prepared:
                logged.update(state.prepare(s, t, view))
                prepared.add(term.state_key)
            terms[name] = self.weights[name] * term.compute(s, t, view, state)
        terms["loss"] = sum(terms.values())
        return {**terms, **logged}

    @staticmethod
    def _inputs(term: Term, out: dict, teacher: dict) -> tuple[Tensor, Tensor]:
        if term.feature is None:
            return out["logits"], teacher["logits"]
        if term.adapted:
            return out["adapted"][term.feature], teacher[term.feature]
        return out["features"][term.feature], teacher[term.feature]

    def eval_model(self) -> nn.Module:
        model = unwrap(self.trainable)
        return model.student if isinstance(model, StudentWithAdapters) else model

    def extra_state(self) -> dict:
        return {key: state.state_dict() for key, state in self.states.items()}

    def load_extra_state(self, state: dict) -> None:
        for key, part in self.states.items():
            if key not in state:
                raise KeyError(
                    f"the checkpoint has no '{key}' state, which this method needs; it was "
                    "written by a run with other distillation terms"
                )
            part.load_state_dict(state[key])

    def parts(self) -> list:
        return [self.trainable, *([self.teacher] if self.teacher is not None else [])] + list(
            self.states.values()
        )
