"""Helpers the checkpoint converters share (convert.py, convert_segformer.py, checkpointed.py)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

SHOW = 5  # key names an error lists before "(+N more)"


def unwrap(state: Mapping) -> Mapping:
    """The state_dict inside a whole checkpoint dict (mmseg's {"meta", "state_dict"}, or a
    {"model": ...} file); the mapping itself otherwise."""
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), Mapping):
            return state[key]
    return state


def strip_module(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`state` without DDP's "module." prefixes."""
    out = {}
    for key, value in state.items():
        while key.startswith("module."):
            key = key[len("module.") :]
        out[key] = value
    return out


def names(keys: list[str]) -> str:
    """The first SHOW keys, comma-separated, with how many more there are."""
    more = f" (+{len(keys) - SHOW} more)" if len(keys) > SHOW else ""
    return ", ".join(keys[:SHOW]) + more
