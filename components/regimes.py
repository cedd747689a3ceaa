"""The three training regimes as values: one table, looked up once by method name.

    regime = regime_of(cfg.method.name)       # SUPERVISED for "sstkd", SEMI_SUPERVISED for ...
    regime.needs_teacher(cfg.method.name)     # a separately trained, frozen teacher?
    regime.weights(cfg)                       # the run's loss weights, published ones filled in
    datasets, steps = regime.build_datasets(cfg, info, num_workers)
    method = regime.build_method(cfg, student, teacher, num_classes=k)

Each regime owns its method names (with their published loss weights), its pipeline and run-name
prefix, its config section (only a run of this regime may set those keys), its data streams and
their dtypes, its dataset builder, its method builder and its own checks. Nothing else in the
project compares method names. Adding a regime: docs/architecture.md.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from components.distillation.terms import LABEL_WEIGHTS, TERMS
from components.distillation.terms import METHODS as SUPERVISED_ROWS
from components.schema import MITS, Config, ConfigError


@dataclass(frozen=True)
class Stream:
    """One Ray dataset a training step draws a batch from."""

    dataset: str  # its name among the trainer's datasets
    prefix: str  # prefix of its keys in the step's batch
    dtypes: Mapping[str, str]  # column -> torch dtype name


# As the rows travel (uint8 images and masks); the worker makes the model's float32 images and
# int64 masks on its device (components/data/device.model_batch).
LABELED = {"image": "uint8", "mask": "uint8", "valid": "bool"}
WEAK = {**LABELED, "labels": "float32", "area": "bool", "background_only": "bool"}
UNLABELED = {
    "image": "uint8",
    "image_strong": "uint8",
    "mask": "uint8",
    "area": "bool",
    "valid": "bool",
}


@dataclass(frozen=True)
class Regime:
    name: str  # "supervised", "semi-supervised", "weakly supervised"
    pipeline: str  # the entry script that runs it
    run_prefix: str  # run folders are named <prefix>-<method>-<backbone>-<hash>
    methods: Mapping[str, Mapping[str, float]]  # method -> its published loss weights
    label_weights: Mapping[str, float]  # the label terms' defaults (ce, aux) where there are any
    terms: Mapping[str, Any]  # the other terms (supervised: the live `terms.TERMS` table)
    weights_key: str  # where the weights mapping lives in the config
    sections: tuple[str, ...]  # the config keys only this regime's runs may set
    streams: tuple[Stream, ...]
    datasets: Callable[[Config, Any, int], tuple[dict, int]]
    method: Callable[..., Any]
    checks: Callable[[Config], None]
    teacher: Callable[[str], bool] = lambda method: False

    @property
    def weight_keys(self) -> tuple[str, ...]:
        """Every key the weights mapping may hold."""
        return (*self.label_weights, *self.terms)

    def needs_teacher(self, method: str) -> bool:
        """Whether `method` distils from a separately trained, frozen teacher (semi-supervised
        methods make their own, an EMA of the student; TSCD's network teaches itself)."""
        return self.teacher(method)

    def weights(self, cfg: Config) -> dict[str, float]:
        """The method's published weights, overridden and extended by the configured ones
        (the label terms' defaults first, so a mapping that leaves them out keeps them)."""
        configured = _get(cfg, self.weights_key)
        return {**self.label_weights, **self.methods[cfg.method.name], **configured}

    def build_datasets(self, cfg: Config, info, num_workers: int) -> tuple[dict, int]:
        """({name: Ray dataset} with every stream's and "val", steps per epoch per worker)."""
        return self.datasets(cfg, info, num_workers)

    def build_method(self, cfg: Config, student, teacher=None, **kwargs):
        """kwargs: num_classes, autocast_dtype, ignore_index."""
        return self.method(cfg, student, teacher, **kwargs)

    def validate(self, cfg: Config) -> None:
        """This regime's checks, and no key of another regime's section set."""
        key = self.weights_key
        for name, value in _get(cfg, key).items():
            if name not in self.weight_keys:
                close = difflib.get_close_matches(name, self.weight_keys, n=1, cutoff=0.5)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(
                    f"'{key}.{name}': not a loss weight of the {self.name} regime{hint}; "
                    f"known: {list(self.weight_keys)}"
                )
            if value < 0:
                raise ConfigError(f"'{key}.{name}': must be >= 0, got {value}")
        for other in REGIMES:
            if other is not self:
                _check_untouched(cfg, other, self, cfg.method.name)
        self.checks(cfg)


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _changed(value: Any, default: Any, key: str) -> list[str]:
    """The dotted keys under `key` whose value differs from the schema default."""
    if is_dataclass(value):
        return [
            k
            for f in fields(value)
            for k in _changed(getattr(value, f.name), getattr(default, f.name), f"{key}.{f.name}")
        ]
    if isinstance(value, dict):
        names = sorted(set(value) | set(default))
        return [f"{key}.{n}" for n in names if value.get(n) != default.get(n)]
    return [] if value == default else [key]


def _check_untouched(cfg: Config, owner: Regime, run: Regime, method: str) -> None:
    default = Config()
    for section in owner.sections:
        changed = _changed(_get(cfg, section), _get(default, section), section)
        if changed:
            raise ConfigError(
                f"'{changed[0]}' belongs to the {owner.name} regime ({', '.join(owner.methods)}"
                f"; {owner.pipeline}), but method '{method}' is {run.name}: remove it"
            )


# ----------------------------------------------------------------------------------------------
# Supervised: a student, its labels and (optionally) a frozen teacher


def _supervised_datasets(cfg: Config, info, num_workers: int) -> tuple[dict, int]:
    from components.data.ingest import build_datasets, steps_per_epoch
    from components.data.semisup_plan import labeled_selection

    # `data.labeled_count` (the supervised-only baseline of a semi-supervised comparison) trains
    # on that labeled subset only.
    keep_ids, rows = labeled_selection(cfg.data, info)
    datasets = build_datasets(cfg.data, info, keep_ids)
    d = cfg.data
    steps = steps_per_epoch(info, d.train_split, d.batch_size, num_workers, rows * d.train_repeat)
    return datasets, steps


def _supervised_method(
    cfg: Config, student, teacher=None, num_classes=None, autocast_dtype=None, ignore_index=255
):
    from components.distillation.distiller import Distiller
    from components.distillation.terms import method_terms

    w = SUPERVISED.weights(cfg)
    return Distiller(
        student,
        teacher,
        method_terms(cfg.method.name, w),
        cfg.method,
        num_classes if num_classes is not None else student.num_classes,
        TERMS,
        ce_weight=w["ce"],
        aux_weight=w["aux"],
        autocast_dtype=autocast_dtype,
    )


def _supervised_checks(cfg: Config) -> None:
    weights = SUPERVISED.weights(cfg)
    terms = [k for k, v in weights.items() if k not in LABEL_WEIGHTS and v > 0]
    if terms and not SUPERVISED.needs_teacher(cfg.method.name):
        raise ConfigError(
            f"'method.weights.{terms[0]}': method '{cfg.method.name}' trains without a teacher, "
            f"so it takes no distillation term (set method.name to one that has a teacher)"
        )
    a = cfg.method.adversarial
    if a.form == "hinge" and weights.get("adversarial", 0) > 0:
        from components.data.augment import crop_hw

        side = min(crop_hw(cfg.data.crop_size)) // cfg.model.output_stride
        if side < 64:
            raise ConfigError(
                "'method.adversarial.form': hinge (CIRKD's discriminator: four stride-2 4x4 "
                f"convs, then a 4x4 one) needs logits of at least 64x64; data.crop_size "
                f"{cfg.data.crop_size} at output stride {cfg.model.output_stride} gives {side}"
            )
    if weights.get("structural", 0) > 0:
        from components.data.augment import crop_hw
        from components.distillation.contourlet import max_levels

        ch, cw = crop_hw(cfg.data.crop_size)
        low_h, low_w = -(-ch // 4), -(-cw // 4)  # the stride-4 `low` map of a training crop
        limit = max_levels(low_h, low_w)
        if cfg.method.cdm.levels > limit:
            raise ConfigError(
                f"'method.cdm.levels': {cfg.method.cdm.levels} is too deep for the "
                f"{low_h}x{low_w} low-level map of {ch}x{cw} crops: at most {limit} levels"
            )
    _no_weak_heads(cfg)


def _no_weak_heads(cfg: Config) -> None:
    # Other methods never train the classifier and affinity heads (DDP would fail on them).
    if cfg.model.cls_head:
        raise ConfigError(
            f"'model.cls_head': the classifier/affinity heads are for {list(WEAKLY.methods)}, "
            f"not '{cfg.method.name}'"
        )


SUPERVISED = Regime(
    name="supervised",
    pipeline="pipelines/distill.py",
    run_prefix="distill",
    methods=SUPERVISED_ROWS,
    label_weights=LABEL_WEIGHTS,
    terms=TERMS,
    weights_key="method.weights",
    sections=(
        "method.weights",
        "method.temperature",
        "method.cwd_temperature",
        "method.skd_pool_size",
        "method.dtiem",
        "method.cdm",
        "method.adversarial",
        "method.cirkd",
    ),
    streams=(Stream("train", "", LABELED),),
    datasets=_supervised_datasets,
    method=_supervised_method,
    checks=_supervised_checks,
    teacher=lambda method: bool(SUPERVISED_ROWS.get(method)),  # a row with terms
)


# ----------------------------------------------------------------------------------------------
# Semi-supervised: few masks, many unlabeled images, an EMA teacher


def _semisup_datasets(cfg: Config, info, num_workers: int) -> tuple[dict, int]:
    from components.data.ingest import build_semisup_datasets

    # A labeled and an unlabeled stream; an epoch is one pass over the larger one.
    datasets, steps, _ = build_semisup_datasets(cfg.data, info, cfg.method.semisup, num_workers)
    return datasets, steps


def _semisup_method(
    cfg: Config, student, teacher=None, num_classes=None, autocast_dtype=None, ignore_index=255
):
    from components.semisup.method import SemiSupervised

    return SemiSupervised(
        student, cfg.method, SEMI_SUPERVISED.weights(cfg), ignore_index=ignore_index
    )


SEMI_SUPERVISED = Regime(
    name="semi-supervised",
    pipeline="pipelines/semisup.py",
    run_prefix="semisup",
    methods={
        "fixmatch": {"unsup": 1.0},
        # relation 0.01: the relation loss lost its τ² factor (CIRKDv2's scale, whose weight is
        # 1; components/semisup/cross_image.py), and 0.01 = the former 1 x τ² at τ = 0.1, so
        # the default run trains as before. Issue 21 item 10: searched by the Tune sweep.
        "cross_image": {"unsup": 1.0, "relation": 0.01, "style": 0.1},
    },
    label_weights=LABEL_WEIGHTS,
    terms=dict.fromkeys(("unsup", "relation", "style")),
    weights_key="method.semisup.weights",
    sections=("method.semisup",),
    streams=(Stream("train", "", LABELED), Stream("unlabeled", "u_", UNLABELED)),
    datasets=_semisup_datasets,
    method=_semisup_method,
    checks=_no_weak_heads,
)


# ----------------------------------------------------------------------------------------------
# Weakly supervised: image-level labels, a network that teaches itself


def _weak_datasets(cfg: Config, info, num_workers: int) -> tuple[dict, int]:
    from components.data.ingest import build_datasets, steps_per_epoch

    # Image-level labels only; the masks travel along for diagnostics.
    d = cfg.data
    rows = info.splits[d.train_split].rows * d.train_repeat
    steps = steps_per_epoch(info, d.train_split, d.batch_size, num_workers, rows)
    return build_datasets(d, info, weak=True), steps


def _weak_method(
    cfg: Config, student, teacher=None, num_classes=None, autocast_dtype=None, ignore_index=255
):
    from components.weakly.tscd import TSCD

    return TSCD(student, cfg.method, WEAKLY.weights(cfg), ignore_index=ignore_index)


def _weak_checks(cfg: Config) -> None:
    m = cfg.model
    if m.backbone not in MITS or not m.cls_head:
        raise ConfigError(
            f"'model.cls_head': method '{cfg.method.name}' needs a MiT backbone with "
            f"model.cls_head=true (got backbone {m.backbone}, cls_head {m.cls_head})"
        )


WEAKLY = Regime(
    name="weakly supervised",
    pipeline="pipelines/wsss.py",
    run_prefix="wsss",
    methods={"tscd": {"cls": 1.0, "seg": 0.1, "aff": 0.1, "scd": 0.1}},
    label_weights={},
    terms=dict.fromkeys(("cls", "seg", "aff", "scd")),
    weights_key="method.weakly.weights",
    sections=("method.weakly",),
    streams=(Stream("train", "", WEAK),),
    datasets=_weak_datasets,
    method=_weak_method,
    checks=_weak_checks,
)


REGIMES: tuple[Regime, ...] = (SUPERVISED, SEMI_SUPERVISED, WEAKLY)
METHODS: tuple[str, ...] = tuple(m for r in REGIMES for m in r.methods)


def regime_of(method: str) -> Regime:
    """The regime of a method name; ConfigError naming `method.name` for an unknown one."""
    for regime in REGIMES:
        if method in regime.methods:
            return regime
    raise ConfigError(f"'method.name': '{method}' not one of {METHODS}")
