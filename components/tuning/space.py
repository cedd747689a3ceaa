"""The sweep file: a base distill config, fixed overrides, a search space and the sweep settings.

    spec = load_sweep("configs/tune_sstkd_cityscapes.yaml", ["sweep.num_samples=4"])
    spec.base          # the distill Config every trial starts from (validated)
    spec.search        # {"method.weights.structural": Distribution("loguniform", (0.1, 10)), ...}
    spec.trial_config({"method.weights.structural": 2.0})   # a complete, validated distill Config

The search space uses distill's own dotted keys, written as the text of a call:

    search:
      method.weights.structural: loguniform(0.1, 10)
      method.dtiem.levels: choice([4, 8, 16, 32, 64, 128])

Every key, distribution and range is checked before any trial starts: a key that is not in
distill's schema, an unknown distribution, bad arguments, or a value the distribution can produce
that distill's validation rejects (its bounds, each choice) fail with the key named. Plain Python:
no Ray here (the Ray side is components/training/sweep.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from components.config import (
    SYNTHETIC_PRETRAINED,
    Config,
    ConfigError,
    _suggest,
    fingerprint,
    known_keys,
    merge_config,
    open_weight_maps,
    validate,
)
from components.regimes import REGIMES
from components.renamed import RENAMED, renamed_key
from components.training.storage import absolute_storage
from components.tuning.distributions import DISTRIBUTIONS, Distribution, parse_distribution

SCHEDULERS = ("asha", "fifo")
# What the training loop reports each epoch (components/training/loop.py): what a sweep can rank by.
REPORTED_METRICS = (
    "miou",
    "pixel_acc",
    "best_miou",
    "teacher_miou",
    "lr",
    "loss",
    *dict.fromkeys(k for r in REGIMES for k in r.weight_keys),
    "critic",
    "images_per_s",
    "data_wait_share",
    "train_s",
    "eval_s",
    "bad_rows",
)
# Keys a sweep may not search: they decide what a trial is (its length, resources, name, data).
NOT_SEARCHABLE = ("trainer.", "data.root", "data.train_split", "data.val_split")


@dataclass
class SweepSettings:
    name: str | None = None  # None: the sweep file's name without .yaml
    storage_path: str | None = None  # None: distill's trainer.storage_path
    num_samples: int = 4  # trials drawn (with `grid`, per grid point)
    metric: str = "miou"  # reported by every trial once per epoch
    mode: str = "max"
    scheduler: str = "asha"  # asha: stops poor trials early; fifo: runs every trial to the end
    grace_period: int = 1  # ASHA: epochs every trial gets before it can be stopped
    reduction_factor: int = 2  # ASHA: keep the best 1/reduction_factor at each rung
    # Trials at once. None: what the cluster can give all the workers of (GPUs, else CPUs).
    max_concurrent_trials: int | None = None
    # CPUs of the trial's driver, which only waits on its TorchTrainer. 0: none; it then runs on
    # the head node (a stable node in clusters/), like Train's controller. With even 0.01 CPU,
    # a 1-worker trial on a 2-CPU machine no longer fits (worker + its data tasks + driver).
    driver_cpus: float = 0.0
    max_failures: int = 0  # restarts of a failed trial (from its last checkpoint)
    seed: int | None = 0  # the search's sampling seed (None: not reproducible)


@dataclass
class SweepSpec:
    source: str  # the sweep file, or "embedded default"
    base: Config
    overrides: dict[str, Any]
    search: dict[str, Distribution]
    settings: SweepSettings

    def trial_config(self, params: dict[str, Any]) -> Config:
        """The distill Config of one trial: the base with `params` (dotted keys) set."""
        base = OmegaConf.structured(self.base)
        open_weight_maps(base)
        merged = OmegaConf.merge(base, _dotted(params))
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
        validate(cfg)
        return cfg


def _dotted(values: dict[str, Any]):
    cfg = OmegaConf.create({})
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def _check_settings(s: SweepSettings, source: str) -> None:
    def bad(key: str, msg: str) -> ConfigError:
        return ConfigError(f"{source}: 'sweep.{key}' {msg}")

    if s.num_samples < 1:
        raise bad("num_samples", f"must be >= 1, got {s.num_samples}")
    if s.mode not in ("max", "min"):
        raise bad("mode", f"must be 'max' or 'min', got {s.mode!r}")
    if s.scheduler not in SCHEDULERS:
        raise bad("scheduler", f"must be one of {SCHEDULERS}, got {s.scheduler!r}")
    if s.grace_period < 1:
        raise bad("grace_period", f"must be >= 1 epoch, got {s.grace_period}")
    if s.reduction_factor < 2:
        raise bad("reduction_factor", f"must be >= 2, got {s.reduction_factor}")
    if s.max_concurrent_trials is not None and s.max_concurrent_trials < 1:
        raise bad("max_concurrent_trials", f"must be >= 1 or null, got {s.max_concurrent_trials}")
    if not 0 <= s.driver_cpus <= 1:
        raise bad("driver_cpus", f"must be in [0, 1], got {s.driver_cpus}")
    if s.metric not in REPORTED_METRICS:
        lower = {m.lower(): m for m in REPORTED_METRICS}
        close = difflib.get_close_matches(s.metric.lower(), list(lower), n=1)
        hint = f" (did you mean '{lower[close[0]]}'?)" if close else ""
        raise bad(
            "metric",
            f"{s.metric!r} is not reported by training{hint}; one of {', '.join(REPORTED_METRICS)}",
        )
    if s.max_failures < 0:
        raise bad("max_failures", f"must be >= 0, got {s.max_failures}")
    if s.name is not None and (s.name in ("", ".", "..") or any(c in s.name for c in "/\\\0")):
        raise bad("name", f"must be a plain folder name (no '/', not '.' or '..'), got {s.name!r}")


def _check_search_key(key: str, base: Config, source: str) -> None:
    if key not in known_keys():
        raise ConfigError(f"{source}: search key '{key}' is not in distill's schema{_suggest(key)}")
    if any(key == k or (k.endswith(".") and key.startswith(k)) for k in NOT_SEARCHABLE):
        raise ConfigError(
            f"{source}: search key '{key}' cannot be searched: trainer.* and the data location "
            "define the trials themselves (set them under 'overrides:')"
        )
    value = OmegaConf.select(OmegaConf.structured(base), key)
    if OmegaConf.is_config(value):
        raise ConfigError(f"{source}: search key '{key}' is a section; name one of its keys")


def absolute_local_paths(cfg: Config) -> Config:
    """`cfg` with its local file and folder paths made absolute (URIs as they are). Tune runs
    each trial in a working directory of its own, where a relative `data.root` would name
    nothing; absolute paths also let best.yaml run from any directory."""

    def absolute(path: str | None) -> str | None:
        if path is None or path == SYNTHETIC_PRETRAINED:  # the stage's word, not a file
            return path
        return absolute_storage(path)

    model, teacher = cfg.model, cfg.teacher
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, root=absolute(cfg.data.root)),
        model=dataclasses.replace(model, pretrained=absolute(model.pretrained)),
        teacher=dataclasses.replace(
            teacher,
            checkpoint=absolute(teacher.checkpoint),
            model=dataclasses.replace(teacher.model, pretrained=absolute(teacher.model.pretrained)),
        ),
    )


def build_spec(
    raw: dict,
    source: str,
    cli_overrides: list[str] | None = None,
    base_dir: Path | None = None,
    default_name: str = "sweep",
) -> SweepSpec:
    """A validated SweepSpec from the sweep file's contents (a dict). Raises ConfigError."""
    raw = dict(raw or {})
    unknown = sorted(set(raw) - {"distill", "overrides", "search", "sweep"})
    if unknown:
        raise ConfigError(
            f"{source}: unknown top-level key(s) {unknown} "
            "(a sweep file has distill, overrides, search, sweep)"
        )
    # Command-line overrides: `sweep.x=...` set the sweep; anything else is a distill override.
    sweep_cli, distill_cli = [], []
    for item in cli_overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        (sweep_cli if item.startswith("sweep.") else distill_cli).append(item)

    distill_path = raw.get("distill")
    if distill_path is not None:
        p = Path(distill_path)
        if not p.is_absolute() and base_dir is not None and not p.exists():
            p = base_dir / p
        distill_path = str(p)
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{source}: 'overrides' must be a mapping of dotted keys to values")
    items = [f"{k}={_as_override(v)}" for k, v in overrides.items()] + distill_cli
    base = absolute_local_paths(merge_config(distill_path, items))
    validate(base)

    search_raw = raw.get("search") or {}
    if not isinstance(search_raw, dict) or not search_raw:
        raise ConfigError(f"{source}: 'search' must map at least one dotted key to a distribution")
    search = {}
    for key, text in search_raw.items():
        key = renamed_key(key, source) if key in RENAMED else key
        _check_search_key(key, base, source)
        if key in overrides:
            raise ConfigError(f"{source}: '{key}' is both searched and fixed in 'overrides'")
        dist = parse_distribution(key, text)
        current = OmegaConf.select(OmegaConf.structured(base), key)
        continuous = dist.name in ("uniform", "loguniform", "quniform", "qloguniform")
        if continuous and isinstance(current, int) and not isinstance(current, bool):
            raise ConfigError(
                f"{source}: search '{key}' is an integer key but {dist.name} gives floats; "
                "use randint, qrandint, choice or grid"
            )
        search[key] = dist

    try:
        settings_cfg = OmegaConf.merge(
            OmegaConf.structured(SweepSettings()), OmegaConf.create(raw.get("sweep") or {})
        )
        if sweep_cli:
            settings_cfg = OmegaConf.merge(
                settings_cfg, OmegaConf.from_dotlist([i[len("sweep.") :] for i in sweep_cli])
            )
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        known = ", ".join(f.name for f in dataclasses.fields(SweepSettings))
        raise ConfigError(
            f"{source}: bad 'sweep.{key}': {str(e).splitlines()[0]} (keys: {known})"
        ) from e
    settings: SweepSettings = OmegaConf.to_object(settings_cfg)  # type: ignore[assignment]
    if settings.name is None:
        settings.name = default_name
    _check_settings(settings, source)

    spec = SweepSpec(source, base, dict(overrides), search, settings)
    _check_space(spec)
    return spec


def _as_override(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):  # YAML's flow style: one line, nested mappings too
        return json.dumps(value)
    return str(value)


def _check_space(spec: SweepSpec) -> None:
    """Every edge value of every distribution must make a valid distill config on its own."""
    for key, dist in spec.search.items():
        for value in dist.edge_values():
            try:
                spec.trial_config({key: value})
            except (ConfigError, OmegaConfBaseException, ValueError) as e:
                msg = str(e).splitlines()[0]
                raise ConfigError(
                    f"{spec.source}: search '{key}': {dist.text()} can give {value!r}, "
                    f"which distill rejects: {msg}"
                ) from e


def load_sweep(path: str | None, cli_overrides: list[str] | None = None) -> SweepSpec:
    """Read and validate a sweep file (None: the embedded default sweep). Raises ConfigError."""
    if path is None:
        return build_spec(DEFAULT_SWEEP, "embedded default", cli_overrides)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(p), resolve=True)
    except Exception as e:  # yaml errors come in many types
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping (distill, overrides, search, sweep)")
    return build_spec(raw, path, cli_overrides, base_dir=p.parent, default_name=p.stem)


# The embedded default: a small SSTKD sweep on the synthetic dataset (`python pipelines/tune.py`).
DEFAULT_SWEEP: dict = {
    "distill": None,
    "overrides": {
        "trainer.epochs": 3,
        # distill.py's embedded default: both backbones from the synthetic pretraining stage
        "model.pretrained": "synthetic",
        "teacher.model.pretrained": "synthetic",
    },
    "search": {
        "method.weights.structural": "loguniform(0.1, 10)",
        "method.weights.statistical": "loguniform(0.1, 10)",
        "method.dtiem.levels": "choice([4, 8, 16, 32])",
    },
    "sweep": {
        "name": "tune-sstkd-synthetic",
        "num_samples": 4,
        "scheduler": "asha",
        "grace_period": 1,
        "reduction_factor": 2,
    },
}


def identity(spec: SweepSpec) -> dict[str, Any]:
    """What makes a sweep this sweep (a rerun must match it to continue): base config, search
    space and the settings that shape the trials."""
    s = spec.settings
    # Without the teacher checkpoint: tune.py fills it in once the teacher is trained or reused.
    base = dataclasses.replace(
        spec.base, teacher=dataclasses.replace(spec.base.teacher, checkpoint=None)
    )
    return {
        "base": fingerprint(base),
        "search": {k: d.text() for k, d in spec.search.items()},
        "settings": {
            k: getattr(s, k)
            for k in (
                "num_samples",
                "metric",
                "mode",
                "scheduler",
                "grace_period",
                "reduction_factor",
                "seed",
            )
        },
    }


__all__ = [
    "DEFAULT_SWEEP",
    "DISTRIBUTIONS",
    "Distribution",
    "SweepSettings",
    "SweepSpec",
    "build_spec",
    "identity",
    "load_sweep",
    "parse_distribution",
]
