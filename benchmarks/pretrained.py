"""The method benchmarks' `--pretrained` option: backbones from the synthetic pretraining stage.

    overrides = pretrained_overrides(merge_config(None, overrides), ["model", "teacher.model"])

Each named model's backbone is pretrained once by classification on its own synthetic image set
(components/training/pretrain.py, on Ray Train; about a minute or two per backbone on 2 cores)
and cached under trainer.storage_path; the overrides returned point `<key>.pretrained` at the
files, so the benchmark's in-process runs load them as any pretrained file. Ray is shut down
afterwards, so its processes do not share the cores with the timed runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.config import Config

CHOICES = ("synthetic", "none")


def pretrained_overrides(cfg: Config, keys: list[str]) -> list[str]:
    """`<key>.pretrained=<file>` for each key ("model", "teacher.model") of `cfg`."""
    import ray

    from components.training.pretrain import pretrained_backbone
    from pipelines._common import init_ray, quiet_environment

    quiet_environment(verbose=False)
    init_ray()
    try:
        out = []
        for key in keys:
            model = cfg.model if key == "model" else cfg.teacher.model
            out.append(f"{key}.pretrained={pretrained_backbone(model, cfg)}")
        return out
    finally:
        ray.shutdown()
