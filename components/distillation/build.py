"""Build a method from the config: a `match` on `method.name`, no registry.

Each supervised KD method is a set of weighted terms (see `distiller.py`). The weights come from
`method.weights`; `pi` and `adv` default (None) to the value the method's paper uses.
"""

from __future__ import annotations

import torch
from torch import nn

from components.config import SEMISUP_METHODS, WEAKLY_METHODS, Config, MethodWeights
from components.distillation.distiller import Distiller
from components.distillation.protocol import Method
from components.distillation.supervised import Supervised


def needs_teacher(name: str) -> bool:
    """Whether a method distils from a separately trained, frozen teacher (the semi-supervised
    methods make their own, an EMA of the student; TSCD's network teaches itself)."""
    return name not in ("none", *SEMISUP_METHODS, *WEAKLY_METHODS)


def method_terms(name: str, w: MethodWeights) -> dict[str, float]:
    """The distillation terms of method `name` with their weights (0 = switched off).

    `pi` and `adv` set explicitly (not null) are added to any method, so pixel KD or the
    adversarial term combine with every other method (e.g. `method.name=cirkd
    method.weights.adv=0.01`)."""
    terms = _published_terms(name, w)
    for key in ("pi", "adv"):
        value = getattr(w, key)
        if value is not None and key not in terms:
            terms[key] = value
    return terms


def _published_terms(name: str, w: MethodWeights) -> dict[str, float]:

    def pick(value: float | None, default: float) -> float:
        return default if value is None else value

    match name:
        case "kd":
            return {"pi": pick(w.pi, 1.0)}
        case "cwd":
            return {"cwd_feat": w.cwd_feat, "cwd_logit": w.cwd_logit}
        case "skd":
            return {"pi": pick(w.pi, 1.0), "skd": w.skd, "adv": pick(w.adv, 0.001)}
        case "adversarial":
            return {"adv": pick(w.adv, 0.001)}
        case "cirkd":
            return {
                "pi": pick(w.pi, 1.0),
                "batch_pixel": w.batch_pixel,
                "memory_pixel": w.memory_pixel,
                "memory_region": w.memory_region,
            }
        case "sstkd":
            return {"pi": pick(w.pi, 10.0), "adv": pick(w.adv, 0.1), "str": w.str, "sta": w.sta}
        case _:
            raise ValueError(f"'method.name': unknown distillation method '{name}'")


def build_method(
    cfg: Config,
    student: nn.Module,
    teacher: nn.Module | None = None,
    num_classes: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    ignore_index: int = 255,
) -> Method:
    m, w = cfg.method, cfg.method.weights
    if m.name == "none":
        return Supervised(student, ce_weight=w.ce, aux_weight=w.aux)
    if m.name in SEMISUP_METHODS:
        from components.semisup.method import SemiSupervised

        return SemiSupervised(student, m, ignore_index=ignore_index)
    if m.name in WEAKLY_METHODS:
        from components.weakly.tscd import TSCD

        return TSCD(student, m, ignore_index=ignore_index)
    if teacher is None:
        raise ValueError(f"method '{m.name}' needs a teacher model")
    return Distiller(
        student,
        teacher,
        method_terms(m.name, w),
        m,
        num_classes if num_classes is not None else student.num_classes,
        ce_weight=w.ce,
        aux_weight=w.aux,
        autocast_dtype=autocast_dtype,
    )
