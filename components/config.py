"""Loading and checking the configuration: a YAML file and `key.sub=value` overrides onto the
schema of `components.schema` (nested dataclasses; re-exported here, so `from components.config
import Config` works).

    cfg = load_config(["--config", "configs/kd_synthetic.yaml", "trainer.num_workers=2"])

`load_config` merges the YAML and the overrides onto the schema with OmegaConf (structured
configs), so an unknown key or a value of the wrong type fails at once with the key named (the
loss-weight mappings take any key: the run's regime checks them in `validate`); `validate` then
checks the values (ranges, choices, the regime's own checks, no key of another regime's
section) before any work starts. Keys renamed in 0.2 are moved by `components.renamed`.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import math
import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from components.renamed import RENAMED, rename_keys, rename_override
from components.schema import (
    BACKBONES,
    HEADS,
    MITS,
    REFINEMENTS,
    RESNETS,
    STRONG_AUGMENTATIONS,
    SYNTHETIC_PRETRAINED,
    SYNTHETIC_ROOTS,
    AdversarialConfig,
    CDMConfig,
    CIRKDConfig,
    Config,
    ConfigError,
    DataConfig,
    DTIEMConfig,
    EvalConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    SemiSupConfig,
    SyntheticConfig,
    TeacherConfig,
    TrainerConfig,
    WeaklyConfig,
)

# `model.variant` of ResNet networks (components/models/resnet.py ResNet.VARIANTS, heads.py
# VARIANTS; docs/methods.md "Model variants"). "mmseg" is built for ResNet backbones only.
MODEL_VARIANTS = ("torchvision", "cirkd", "mmseg")

# ----------------------------------------------------------------------------------------------
# Loading


def _known_keys(schema: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(schema):
        key = f"{prefix}{f.name}"
        keys.append(key)
        value = getattr(schema, f.name)
        if is_dataclass(value):
            keys.extend(_known_keys(value, key + "."))
    return keys


def known_keys() -> list[str]:
    """Every dotted key of the schema, the loss weights of every regime included."""
    from components.regimes import REGIMES

    keys = _known_keys(Config())
    for regime in REGIMES:
        keys += [f"{regime.weights_key}.{k}" for k in regime.weight_keys]
    return keys


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, known_keys(), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def open_weight_maps(cfg) -> None:
    """The loss-weight mappings take any key; each regime checks its own (`validate`)."""
    for section in (cfg.method, cfg.method.semisup, cfg.method.weakly):
        OmegaConf.set_struct(section.weights, False)


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    msg = (getattr(err, "msg", None) or str(err)).splitlines()[0]
    if "not in struct" in str(err) or "Key '" in msg and "not in" in msg:
        return ConfigError(f"{source}: unknown key '{key}'{_suggest(key)}")
    return ConfigError(f"{source}: bad value for '{key}': {msg}")


def merge_config(
    yaml_path: str | None = None, overrides: list[str] | None = None, base: Config | None = None
) -> Config:
    """Schema defaults (or `base`) <- YAML file <- dotted overrides. Raises ConfigError."""
    merged = OmegaConf.structured(base if base is not None else Config())
    OmegaConf.set_struct(merged, True)
    open_weight_maps(merged)
    if yaml_path:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {yaml_path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # yaml syntax errors come in many types
            raise ConfigError(f"{yaml_path}: not valid YAML: {e}") from e
        tree = OmegaConf.to_container(loaded)
        if isinstance(tree, dict):
            loaded = OmegaConf.create(rename_keys(tree, yaml_path))
        try:
            merged = OmegaConf.merge(merged, loaded)
        except OmegaConfBaseException as e:
            raise _explain(e, yaml_path) from e
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        item = rename_override(item)
        key = item.split("=", 1)[0]
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            err = _explain(e, "command line")
            if not getattr(e, "full_key", None):
                err = ConfigError(f"command line: bad override '{item}' for '{key}'{_suggest(key)}")
            raise err from e
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    return cfg


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"'{key}': {msg}")


def _validate_model(m: ModelConfig, prefix: str) -> None:
    _check(m.backbone in BACKBONES, f"{prefix}.backbone", f"'{m.backbone}' not one of {BACKBONES}")
    _check(m.head in HEADS, f"{prefix}.head", f"'{m.head}' not one of {HEADS}")
    _check(0 < m.width <= 4, f"{prefix}.width", f"must be in (0, 4], got {m.width}")
    if m.backbone in MITS:
        _check(
            m.head == "segformer",
            f"{prefix}.head",
            f"MiT backbones take the segformer head, got '{m.head}'",
        )
        _check(m.output_stride in (8, 16, 32), f"{prefix}.output_stride", "must be 8, 16 or 32")
    else:
        _check(
            m.head != "segformer",
            f"{prefix}.head",
            f"the segformer head needs a MiT backbone ({', '.join(MITS)}), got '{m.backbone}'",
        )
        _check(
            not m.cls_head,
            f"{prefix}.cls_head",
            "the classifier/affinity heads are built on MiT backbones only",
        )
        _check(m.output_stride in (8, 16), f"{prefix}.output_stride", "must be 8 or 16")
    _check(0 <= m.drop_path < 1, f"{prefix}.drop_path", "must be in [0, 1)")
    _check(
        m.variant in MODEL_VARIANTS,
        f"{prefix}.variant",
        f"'{m.variant}' not one of {MODEL_VARIANTS}",
    )
    _check(
        m.variant != "mmseg" or m.backbone in RESNETS,
        f"{prefix}.variant",
        f"mmseg is built for ResNet backbones ({', '.join(RESNETS)}), got '{m.backbone}'",
    )
    resnet_only = (
        ("variant", m.variant != "torchvision"),
        ("head_channels", m.head_channels is not None),
        ("aux_channels", m.aux_channels is not None),
    )
    for key, is_set in resnet_only:
        _check(
            not (is_set and m.backbone in MITS),
            f"{prefix}.{key}",
            "applies to ResNet backbones only (MiT: leave it at its default)",
        )
    for key in ("head_channels", "aux_channels"):
        value = getattr(m, key)
        _check(value is None or value >= 1, f"{prefix}.{key}", f"must be >= 1, got {value}")
    if m.pretrained is not None and m.pretrained != SYNTHETIC_PRETRAINED:
        _check(
            Path(m.pretrained).is_file(),
            f"{prefix}.pretrained",
            f"no file {m.pretrained} ('{SYNTHETIC_PRETRAINED}': the synthetic pretraining stage)",
        )


def validate(cfg: Config) -> None:
    """Check values that the types alone cannot; raises ConfigError naming the key."""
    d, o, t = cfg.data, cfg.optim, cfg.trainer
    _check(
        _crop_ok(d.crop_size),
        "data.crop_size",
        f"must be >= 16 or [h, w] each >= 16, got {d.crop_size}",
    )
    _check(0 < d.scale_min <= d.scale_max, "data.scale_min", "need 0 < scale_min <= scale_max")
    _check(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}")
    _check(d.val_batch_size >= 1, "data.val_batch_size", "must be >= 1")
    _check(0 <= d.max_bad_fraction <= 1, "data.max_bad_fraction", "must be in [0, 1]")
    _check(d.prefetch_batches >= 0, "data.prefetch_batches", "must be >= 0")
    s = d.synthetic
    _check(s.num_classes >= 2, "data.synthetic.num_classes", "must be >= 2")
    _check(s.size >= 16, "data.synthetic.size", "must be >= 16")
    _check(s.num_train >= 1 and s.num_val >= 1, "data.synthetic.num_train", "splits need rows")
    _validate_model(cfg.model, "model")
    _validate_model(cfg.teacher.model, "teacher.model")
    _check(cfg.teacher.epochs >= 1, "teacher.epochs", "must be >= 1")
    _check(cfg.teacher.lr > 0, "teacher.lr", f"must be > 0, got {cfg.teacher.lr}")
    _validate_pretrain(cfg.pretrain)
    m = cfg.method
    from components.regimes import regime_of

    regime = regime_of(m.name)  # ConfigError naming method.name for an unknown method
    _check(m.temperature > 0, "method.temperature", "must be > 0")
    _check(m.cwd_temperature > 0, "method.cwd_temperature", "must be > 0")
    _check(m.skd_pool_size >= 1, "method.skd_pool_size", "must be >= 1")
    _check(m.dtiem.levels >= 2, "method.dtiem.levels", f"must be >= 2, got {m.dtiem.levels}")
    _check(m.dtiem.iterations >= 0, "method.dtiem.iterations", "must be >= 0")
    _check(m.dtiem.clip >= 1, "method.dtiem.clip", f"must be >= 1 (β/N >= 1/N), got {m.dtiem.clip}")
    _check(m.cdm.levels >= 1, "method.cdm.levels", f"must be >= 1, got {m.cdm.levels}")
    d_ = m.cdm.directions
    _check(
        d_ >= 1 and d_ & (d_ - 1) == 0, "method.cdm.directions", f"must be a power of 2, got {d_}"
    )
    a = m.adversarial
    _check(a.form in ("wgan_gp", "hinge"), "method.adversarial.form", "must be wgan_gp or hinge")
    _check(a.critic_weight >= 0, "method.adversarial.critic_weight", "must be >= 0")
    _check(a.critic_lr > 0, "method.adversarial.critic_lr", "must be > 0")
    _check(a.gradient_penalty >= 0, "method.adversarial.gradient_penalty", "must be >= 0")
    _check(a.critic_width >= 4, "method.adversarial.critic_width", "must be >= 4")
    c = m.cirkd
    _check(c.batch_temperature > 0, "method.cirkd.batch_temperature", "must be > 0")
    _check(c.memory_temperature > 0, "method.cirkd.memory_temperature", "must be > 0")
    for key in ("pixel_memory_size", "region_memory_size", "pixels_per_class", "num_anchors"):
        _check(getattr(c, key) >= 1, f"method.cirkd.{key}", "must be >= 1")
    ss = m.semisup
    _check(0 <= ss.threshold <= 1, "method.semisup.threshold", "must be in [0, 1]")
    _check(0 <= ss.ema_momentum < 1, "method.semisup.ema_momentum", "must be in [0, 1)")
    for op in ss.strong:
        _check(
            op in STRONG_AUGMENTATIONS,
            "method.semisup.strong",
            f"'{op}' not one of {STRONG_AUGMENTATIONS}",
        )
    _check(0 <= ss.cutmix_prob <= 1, "method.semisup.cutmix_prob", "must be in [0, 1]")
    _check(ss.relation_temperature > 0, "method.semisup.relation_temperature", "must be > 0")
    if ss.style_memory_momentum is not None:
        _check(
            0 <= ss.style_memory_momentum < 1,
            "method.semisup.style_memory_momentum",
            "must be in [0, 1)",
        )
    _check(
        ss.feature in ("embed", "high", "low"),
        "method.semisup.feature",
        "must be embed, high or low",
    )
    _check(ss.evaluate in ("student", "ema"), "method.semisup.evaluate", "must be student or ema")
    _validate_labeled_loss(ss, d)
    _validate_weakly(cfg)
    regime.validate(cfg)  # its weights, its own checks, no key of another regime's section
    if d.labeled_count is not None:
        _check(d.labeled_count >= 1, "data.labeled_count", f"must be >= 1, got {d.labeled_count}")
    _check(d.train_repeat >= 1, "data.train_repeat", f"must be >= 1, got {d.train_repeat}")
    if d.unlabeled_batch_size is not None:
        _check(d.unlabeled_batch_size >= 1, "data.unlabeled_batch_size", "must be >= 1")
    _check(o.name in ("sgd", "adamw"), "optim.name", f"'{o.name}' not sgd or adamw")
    _check(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    _check(o.head_lr_mult > 0, "optim.head_lr_mult", f"must be > 0, got {o.head_lr_mult}")
    _check(0 <= o.momentum < 1, "optim.momentum", "must be in [0, 1)")
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(o.poly_power >= 0, "optim.poly_power", "must be >= 0")
    _check(o.warmup_iters >= 0, "optim.warmup_iters", "must be >= 0")
    _check(t.num_workers >= 1, "trainer.num_workers", f"must be >= 1, got {t.num_workers}")
    _check(t.cpus_per_worker > 0, "trainer.cpus_per_worker", "must be > 0")
    if t.torch_threads is not None:
        _check(t.torch_threads >= 1, "trainer.torch_threads", "must be >= 1")
    _check(t.epochs >= 1, "trainer.epochs", f"must be >= 1, got {t.epochs}")
    _check(t.num_to_keep >= 1, "trainer.num_to_keep", "must be >= 1")
    _check(t.max_failures >= -1, "trainer.max_failures", "must be >= -1")
    if t.local_mode:
        _check(t.num_workers == 1, "trainer.local_mode", "true needs trainer.num_workers=1")
        _check(
            t.max_failures == 0,
            "trainer.local_mode",
            "true has no worker process to restart; set trainer.max_failures=0",
        )
        _check(
            "://" not in str(t.storage_path),
            "trainer.local_mode",
            "true writes checkpoints to a local (or mounted) trainer.storage_path, not a URI",
        )
    _check(t.resource_wait_s >= 0, "trainer.resource_wait_s", "must be >= 0")
    _check(t.autoscale_wait_s >= 0, "trainer.autoscale_wait_s", "must be >= 0")
    _check(t.log_every >= 1, "trainer.log_every", "must be >= 1")
    _check(t.progress in ("auto", "bar", "lines"), "trainer.progress", "must be auto, bar or lines")
    _check(t.image_every >= 0, "trainer.image_every", "must be >= 0")
    _check(t.eval_every >= 1, "trainer.eval_every", f"must be >= 1, got {t.eval_every}")
    _check(t.panel_images >= 0, "trainer.panel_images", "must be >= 0")
    if t.name is not None:
        _check_name(t.name, "trainer.name")
    _validate_eval(cfg)
    _check_finite(cfg, "")


def _crop_ok(crop: Any) -> bool:
    """`data.crop_size`: an int >= 16, or [height, width] with each >= 16."""
    if isinstance(crop, int) and not isinstance(crop, bool):
        return crop >= 16
    if isinstance(crop, (list, tuple)) and len(crop) == 2:
        return all(isinstance(v, int) and not isinstance(v, bool) and v >= 16 for v in crop)
    return False


def _validate_labeled_loss(ss: SemiSupConfig, d) -> None:
    """`method.semisup.labeled_loss` and UniMatch's OHEM settings (components/semisup/ohem.py),
    and `loss_scale`."""
    _check(
        ss.labeled_loss in ("ce", "ohem"),
        "method.semisup.labeled_loss",
        f"must be ce or ohem, got '{ss.labeled_loss}'",
    )
    _check(
        0 < ss.ohem_threshold <= 1,
        "method.semisup.ohem_threshold",
        f"must be in (0, 1] (a probability), got {ss.ohem_threshold}",
    )
    _check(
        ss.ohem_min_kept >= 0,
        "method.semisup.ohem_min_kept",
        f"must be >= 0 (pixels of a worker's labeled batch), got {ss.ohem_min_kept}",
    )
    _check(ss.loss_scale > 0, "method.semisup.loss_scale", f"must be > 0, got {ss.loss_scale}")
    if ss.labeled_loss == "ohem" and isinstance(d.crop_size, (int, list, tuple)):
        h, w = (d.crop_size, d.crop_size) if isinstance(d.crop_size, int) else d.crop_size
        pixels = h * w * d.batch_size
        _check(
            ss.ohem_min_kept <= pixels,
            "method.semisup.ohem_min_kept",
            f"{ss.ohem_min_kept} is more than the {pixels} pixels of a worker's labeled batch "
            f"(data.batch_size {d.batch_size} x crop {h}x{w}), so OHEM would never select "
            "(UniMatch's ProbOhemCrossEntropy2d then falls back to plain CE): lower it "
            "(UniMatch's 200000 is for 2 x 801 x 801 per GPU) or use labeled_loss=ce",
        )


def _check_name(name: str, key: str) -> None:
    """A run or sweep name is one folder inside the storage: never `..`, `.`, or a path."""
    plain = name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
    _check(plain, key, f"must be a plain folder name (no '/', not '.' or '..'), got {name!r}")


def _validate_eval(cfg: Config) -> None:
    from components.inference import EvalMode

    e = cfg.eval
    try:
        EvalMode.from_config(e)
    except ValueError as err:
        raise ConfigError(f"eval: {err}") from None
    if e.boundary_width is not None:
        _check(e.boundary_width >= 1, "eval.boundary_width", "must be >= 1 pixel (or null)")


def _check_finite(node: Any, prefix: str) -> None:
    """No float in the config is infinite or NaN (`optim.lr=inf` passes `> 0`)."""
    if is_dataclass(node):
        items = ((f.name, getattr(node, f.name)) for f in fields(node))
    elif isinstance(node, dict):
        items = node.items()
    elif isinstance(node, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(node))
    else:
        if isinstance(node, float) and not math.isfinite(node):
            raise ConfigError(f"{prefix}: must be a finite number, got {node}")
        return
    for name, value in items:
        _check_finite(value, f"{prefix}.{name}" if prefix else str(name))


def _validate_weakly(cfg: Config) -> None:
    w = cfg.method.weakly
    _check(len(w.cam_scales) >= 1, "method.weakly.cam_scales", "need at least one scale")
    _check(all(s > 0 for s in w.cam_scales), "method.weakly.cam_scales", "scales must be > 0")
    _check(
        0 < w.low_threshold <= w.high_threshold < 1,
        "method.weakly.low_threshold",
        f"need 0 < low <= high < 1, got low {w.low_threshold}, high {w.high_threshold}",
    )
    _check(
        w.refine in REFINEMENTS, "method.weakly.refine", f"'{w.refine}' not one of {REFINEMENTS}"
    )
    _check(w.refine_iterations >= 1, "method.weakly.refine_iterations", "must be >= 1")
    _check(
        len(w.refine_dilations) >= 1 and all(d >= 1 for d in w.refine_dilations),
        "method.weakly.refine_dilations",
        "need at least one dilation, each >= 1",
    )
    _check(0 <= w.variation_weight < 1, "method.weakly.variation_weight", "must be in [0, 1)")
    _check(w.affinity_radius >= 1, "method.weakly.affinity_radius", "must be >= 1")
    _check(0 < w.scd_scale < 1, "method.weakly.scd_scale", "must be in (0, 1)")
    _check(w.scd_points >= 1, "method.weakly.scd_points", "must be >= 1")
    _check(w.warmup_iters >= 0, "method.weakly.warmup_iters", "must be >= 0")
    _check(
        w.propagate_after is None or w.propagate_after >= 0,
        "method.weakly.propagate_after",
        "must be >= 0 (or null: never propagate)",
    )


def _validate_pretrain(p) -> None:
    _check(
        p.num_images >= p.batch_size >= 1,
        "pretrain.num_images",
        "need num_images >= batch_size >= 1",
    )
    _check(p.num_val >= 1, "pretrain.num_val", f"must be >= 1, got {p.num_val}")
    _check(p.size >= 16, "pretrain.size", f"must be >= 16, got {p.size}")
    _check(p.num_classes >= 2, "pretrain.num_classes", f"must be >= 2, got {p.num_classes}")
    _check(p.epochs >= 1, "pretrain.epochs", f"must be >= 1, got {p.epochs}")
    _check(p.lr is None or p.lr > 0, "pretrain.lr", f"must be > 0 (or null), got {p.lr}")
    wd = p.weight_decay
    _check(wd is None or wd >= 0, "pretrain.weight_decay", f"must be >= 0 (or null), got {wd}")


def validate_against_dataset(cfg: Config, num_classes: int, source: str) -> None:
    """The config's class count (when given) must be the dataset's."""
    if cfg.data.num_classes is not None and cfg.data.num_classes != num_classes:
        raise ConfigError(
            f"'data.num_classes' is {cfg.data.num_classes} but {source} says {num_classes}"
        )


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore


def from_dict(d: dict) -> Config:
    """A Config from a plain dict (a run's own config, or a checkpoint's `meta.json`: old key
    names are moved to their new places without a warning)."""
    base = OmegaConf.structured(Config())
    open_weight_maps(base)
    tree = _as_data(rename_keys(json.loads(json.dumps(d))))
    merged = OmegaConf.merge(base, OmegaConf.create(tree))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def _as_data(node: Any) -> Any:
    """Strings kept literal: a `${...}` in a stored config (a checkpoint's meta.json, which
    anyone who can write the storage can edit) is not an OmegaConf interpolation to resolve,
    such as `${oc.env:SECRET}`. The configs a run stores are already resolved (`to_dict`)."""
    if isinstance(node, dict):
        return {k: _as_data(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_as_data(v) for v in node]
    if isinstance(node, str) and "${" in node:
        # OmegaConf's escape is `\${`; backslashes right before it are doubled to stay literal.
        return re.sub(r"(\\*)\$\{", lambda m: 2 * m.group(1) + "\\${", node)
    return node


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def fingerprint(obj: Any) -> str:
    """A short stable hash of a config (or part of one), used for deterministic run names."""
    d = (
        to_dict(obj)
        if isinstance(obj, Config)
        else OmegaConf.to_container(OmegaConf.structured(obj), resolve=True)
    )
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]


def parse_args(argv: list[str] | None, description: str = "") -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML file in the schema of components/config.py")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    return args.config, args.overrides


def load_config(argv: list[str] | None = None, base: Config | None = None) -> Config:
    """Parse `--config FILE key=value ...`, merge onto the schema, validate. Raises ConfigError."""
    yaml_path, overrides = parse_args(argv)
    cfg = merge_config(yaml_path, overrides, base)
    validate(cfg)
    return cfg


__all__ = [
    "BACKBONES",
    "HEADS",
    "MISSING",
    "MITS",
    "MODEL_VARIANTS",
    "REFINEMENTS",
    "RENAMED",
    "RESNETS",
    "STRONG_AUGMENTATIONS",
    "SYNTHETIC_PRETRAINED",
    "SYNTHETIC_ROOTS",
    "AdversarialConfig",
    "CDMConfig",
    "CIRKDConfig",
    "Config",
    "ConfigError",
    "DTIEMConfig",
    "DataConfig",
    "EvalConfig",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "PretrainConfig",
    "SemiSupConfig",
    "SyntheticConfig",
    "TeacherConfig",
    "TrainerConfig",
    "WeaklyConfig",
    "fingerprint",
    "from_dict",
    "known_keys",
    "load_config",
    "merge_config",
    "rename_keys",
    "to_dict",
    "to_yaml",
    "validate",
    "validate_against_dataset",
]
