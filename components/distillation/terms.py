"""The supervised distillation terms and methods, as two tables.

`TERMS` names every distillation term (`term.py` says what a `Term` is; each is defined in its
loss's file). `METHODS` is one row per supervised method: the terms it adds to the student's
cross-entropy, with the weights its paper or reference script uses (METHODS.md §1):

    kd           pixel_kd
    cwd          cwd_feature + cwd_logit
    skd          pixel_kd + pairwise + adversarial
    adversarial  adversarial
    cirkd        pixel_kd + batch_pixel + memory_pixel + memory_region
    sstkd        pixel_kd + adversarial + structural + statistical

Each row is the method's own terms. CIRKD's baseline scripts (train_scripts/train_kd/
train_cwd.sh, train_skd.sh) also add pixel KD 1.0 and the hinge adversarial term 0.001 to CWD
and SKD: the Cityscapes configs spell those recipes out in `method.weights`, with
`method.adversarial.form: hinge` (docs/methods.md).

`method.weights` (a mapping) overrides a row: `method.weights.statistical=0` switches a term off
(ablations are config switches), and a term the row lacks is added to it
(`method.name=cirkd method.weights.adversarial=0.01`). `ce` and `aux` there weigh the labels'
cross-entropy and the auxiliary head's.

Adding a term: its loss function and `Term` in one file, a row here, a test
(docs/architecture.md). The order of `TERMS` is the order terms are computed in a step.
"""

from __future__ import annotations

from components.distillation.adversarial import ADVERSARIAL
from components.distillation.cirkd import BATCH_PIXEL, MEMORY_PIXEL, MEMORY_REGION
from components.distillation.contourlet import STRUCTURAL
from components.distillation.cwd import CWD_FEATURE, CWD_LOGIT
from components.distillation.logits import PIXEL_KD
from components.distillation.skd import PAIRWISE
from components.distillation.term import Term
from components.distillation.texture import STATISTICAL

TERMS: dict[str, Term] = {
    "pixel_kd": PIXEL_KD,
    "cwd_logit": CWD_LOGIT,
    "cwd_feature": CWD_FEATURE,
    "pairwise": PAIRWISE,
    "batch_pixel": BATCH_PIXEL,
    "memory_pixel": MEMORY_PIXEL,
    "memory_region": MEMORY_REGION,
    "structural": STRUCTURAL,
    "statistical": STATISTICAL,
    "adversarial": ADVERSARIAL,  # last: its critic steps on this step's logits
}

METHODS: dict[str, dict[str, float]] = {
    "none": {},
    "kd": {"pixel_kd": 1.0},
    "cwd": {"cwd_feature": 50.0, "cwd_logit": 3.0},
    "skd": {"pixel_kd": 1.0, "pairwise": 10.0, "adversarial": 0.001},
    "adversarial": {"adversarial": 0.001},
    "cirkd": {"pixel_kd": 1.0, "batch_pixel": 1.0, "memory_pixel": 0.1, "memory_region": 0.1},
    "sstkd": {"pixel_kd": 10.0, "adversarial": 0.1, "structural": 1.0, "statistical": 1.0},
}

# The labels' terms, weighted in the same `method.weights` mapping.
LABEL_WEIGHTS: dict[str, float] = {"ce": 1.0, "aux": 0.4}


def method_terms(name: str, weights: dict[str, float]) -> dict[str, float]:
    """The distillation terms of method `name` with their weights (0 = switched off): the
    method's row, overridden and extended by the terms set in `weights` (`method.weights`)."""
    if name not in METHODS:
        raise ValueError(f"'method.name': unknown supervised method '{name}' ({sorted(METHODS)})")
    chosen = {k: float(v) for k, v in weights.items() if k not in LABEL_WEIGHTS}
    unknown = sorted(set(chosen) - set(TERMS))
    if unknown:
        raise ValueError(f"unknown distillation terms {unknown}; known: {list(TERMS)}")
    resolved = {**METHODS[name], **chosen}
    return {k: resolved[k] for k in TERMS if k in resolved}  # in computation order
