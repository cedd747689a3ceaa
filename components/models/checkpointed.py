"""A model from one of our checkpoints, ready to predict.

    model, meta = load_checkpoint_model("outputs/<run>", device="cpu")   # eval mode
    meta["class_names"], meta["num_classes"], meta["ignore_index"], meta["model"]

`path` is anything `resolve_checkpoint` accepts: a run folder (its newest complete checkpoint),
a checkpoint folder, a file inside one, or a URI. The weights are verified against meta.json
and loaded with `weights_only=True`; the architecture comes from meta.json's `model` section,
read as data (no interpolation runs on it).
"""

from __future__ import annotations

from torch import nn

from components.config import from_dict
from components.models.build import architecture, build_model
from components.training.checkpoint import CheckpointError, load_model_state, resolve_checkpoint


def load_checkpoint_model(path: str, device="cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode on `device`, the checkpoint's meta.json with `folder` added)."""
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
