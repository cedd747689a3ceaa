"""A model from one of our checkpoints, ready to predict.

    model, meta = load_checkpoint_model("outputs/<run>", device="cpu")   # eval mode
    meta["class_names"], meta["num_classes"], meta["ignore_index"], meta["model"]

`path` is anything `resolve_checkpoint` accepts: a run folder (its newest complete checkpoint),
a checkpoint folder, a file inside one, or a URI. The weights are verified against meta.json
and loaded with `weights_only=True`; the architecture comes from meta.json's `model` section,
read as data (no interpolation runs on it).

    state = load_bare_state("deeplabv3_resnet101_citys_best_model.pth", model_cfg, 19)

A bare state_dict file (a released model: ours, CIRKD's, torchvision's, mmseg's, SegFormer's;
components/models/convert.py) has no meta.json: `model_cfg` describes its architecture, and the
file converts to our names whole or the error names what does not fit.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import Tensor, nn

from components.config import ModelConfig, from_dict
from components.models.build import architecture, build_model
from components.models.convert import convert_state_dict
from components.models.statedict import unwrap
from components.training.checkpoint import (
    CheckpointError,
    load_model_state,
    load_torch_file,
    resolve_checkpoint,
)
from components.training.storage import is_uri


def is_bare_file(path: str) -> bool:
    """A local file that is not inside one of our checkpoint folders (no meta.json beside it)."""
    p = Path(path)
    return not is_uri(path) and p.is_file() and not (p.parent / "meta.json").is_file()


def load_bare_state(path: str, model_cfg: ModelConfig, num_classes: int) -> dict[str, Tensor]:
    """A bare state_dict file's tensors under our names for `model_cfg` (any layout that
    components/models/convert.py knows, whole or not at all: CheckpointError naming the file)."""
    state = load_torch_file(path)
    if isinstance(state, dict):
        state = unwrap(state)
    try:
        return convert_state_dict(state, build_model(architecture(model_cfg), num_classes))
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_checkpoint_model(
    path: str,
    device="cpu",
    model_cfg: ModelConfig | None = None,
    num_classes: int | None = None,
) -> tuple[nn.Module, dict]:
    """(model in eval mode on `device`, the checkpoint's meta.json with `folder` added). A bare
    state_dict file needs `model_cfg` and `num_classes` (its meta is made from them)."""
    if is_bare_file(path):
        if model_cfg is None or num_classes is None:
            raise CheckpointError(
                f"{path}: a bare state_dict file (no meta.json beside it); describe its "
                "architecture (--config FILE with a model section, or model.* overrides)"
            )
        model = build_model(architecture(model_cfg), num_classes)
        model.load_state_dict(load_bare_state(path, model_cfg, num_classes))
        meta = {
            "folder": str(Path(path).parent),
            "num_classes": num_classes,
            "model": dataclasses.asdict(model_cfg),
        }
        return model.to(device).eval(), meta
    folder = resolve_checkpoint(path)
    state, meta = load_model_state(folder)
    model = build_model(
        architecture(from_dict({"model": meta["model"]}).model), meta["num_classes"]
    )
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = " ".join(str(e).splitlines()[:2])
        raise CheckpointError(f"{folder}: weights do not fit its meta.json model ({first})") from e
    meta = dict(meta, folder=str(folder))
    return model.to(device).eval(), meta
