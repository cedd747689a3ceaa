"""Checkpoint files: written atomically, verified on load, found in a run folder.

A checkpoint is a folder with
  model.pt   the student's state_dict (what evaluation and a teacher need; small)
  state.pt   the full training state: trainable weights, optimizer, method extras,
             progress (epoch, iteration, best metric) and every worker's RNG state
  meta.json  config, class names, metrics, and the size and SHA-256 of both .pt files
Each file is written under a temporary name and renamed, meta.json last, so a folder without a
meta.json (or whose files do not match it) is incomplete and is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

MODEL_FILE, STATE_FILE, META_FILE = "model.pt", "state.pt", "meta.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, truncated or of the wrong kind; names the path."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_torch_save(obj: Any, path: Path) -> None:
    """`torch.save(obj, path)` through a hidden temporary file: `path` is complete or absent."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(folder: str | Path, model_state: dict, full_state: dict | None, meta: dict):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {MODEL_FILE: model_state}
    if full_state is not None:
        files[STATE_FILE] = full_state
    meta = dict(meta, files={})
    for name, obj in files.items():
        atomic_torch_save(obj, folder / name)
        meta["files"][name] = {
            "bytes": (folder / name).stat().st_size,
            "sha256": _sha256(folder / name),
        }
    tmp = folder / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2, default=str))
    os.replace(tmp, folder / META_FILE)


def read_meta(folder: str | Path) -> dict:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {META_FILE} (not a checkpoint, or incomplete)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from e


def _load_verified(folder: Path, name: str, meta: dict) -> dict:
    path = folder / name
    expected = meta.get("files", {}).get(name)
    if expected is None or not path.is_file():
        raise CheckpointError(f"{path}: missing")
    _check_file(path, expected)
    return load_torch_file(path)


def _check_file(path: Path, expected: dict) -> None:
    size = path.stat().st_size
    if size != expected["bytes"]:
        raise CheckpointError(
            f"{path}: truncated or incomplete ({size} bytes, meta.json says {expected['bytes']})"
        )
    if _sha256(path) != expected["sha256"]:
        raise CheckpointError(
            f"{path}: corrupted (its SHA-256 differs from the one meta.json recorded; same size, "
            f"{size} bytes)"
        )


def load_torch_file(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated/foreign files
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({e})") from e


def load_model_state(folder: str | Path) -> tuple[dict, dict]:
    """(student state_dict, meta) of a checkpoint folder, verified against meta.json."""
    folder = Path(folder)
    meta = read_meta(folder)
    return _load_verified(folder, MODEL_FILE, meta), meta


def load_full_state(folder: str | Path) -> tuple[dict, dict]:
    folder = Path(folder)
    meta = read_meta(folder)
    return _load_verified(folder, STATE_FILE, meta), meta


def checkpoint_folders(run_dir: str | Path, warn=print, pattern: str = "**") -> list[Path]:
    """Checkpoint folders under a run folder (those matching `pattern`: any depth by default)
    with a readable meta.json, oldest first (by the iteration in meta.json). A folder whose
    meta.json cannot be read is skipped with a warning naming it (`warn`); its files are not
    checked here (`verify_files`)."""
    found = []
    for meta in Path(run_dir).glob(f"{pattern}/{META_FILE}"):
        try:
            iteration = read_meta(meta.parent).get("progress", {}).get("iteration", -1)
        except CheckpointError as e:
            warn(f"warning: skipping checkpoint {meta.parent}: {e}")
            continue
        found.append((iteration, meta.parent))
    return [folder for _, folder in sorted(found)]


def newest_verified(run_dir: str | Path, need_state: bool = False, warn=print) -> Path | None:
    """The newest checkpoint of a run whose files match meta.json (with a full training state
    when `need_state`), or None. Each newer one that fails is skipped with a warning naming it
    and why: a corrupted or half-copied newest checkpoint falls back to the one before."""
    for folder in reversed(checkpoint_folders(run_dir, warn)):
        if need_state and STATE_FILE not in read_meta(folder).get("files", {}):
            continue
        try:
            verify_files(folder)
        except CheckpointError as e:
            warn(f"warning: skipping checkpoint {folder}: {e}")
            continue
        return folder
    return None


def verify_files(folder: str | Path) -> None:
    """Raise CheckpointError unless every file meta.json lists has its size and SHA-256."""
    folder = Path(folder)
    meta = read_meta(folder)
    for name, expected in meta.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        _check_file(path, expected)


def latest_resumable(run_dir: str | Path, warn=print) -> Path | None:
    """The newest checkpoint folder of a run that holds a full training state and passes
    `verify_files`, or None (see `newest_verified`)."""
    return newest_verified(run_dir, need_state=True, warn=warn)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from: the folder itself, a file inside it, or a run folder (latest).
    A URI (s3://, gs://, file://...) is looked up there and copied to a local cache first."""
    if "://" in str(path):
        from components.training.storage import fetch_checkpoint  # storage imports this module

        return fetch_checkpoint(str(path))
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        path = path.parent
    if (path / META_FILE).is_file():
        return path
    if not checkpoint_folders(path, warn=lambda m: None):
        raise CheckpointError(f"{path}: no complete checkpoint (a folder with {META_FILE}) inside")
    folder = newest_verified(path)
    if folder is None:
        raise CheckpointError(f"{path}: no checkpoint inside passes its checksums (see above)")
    return folder


# RNG state as plain tensors and lists, so `torch.load(weights_only=True)` accepts it.


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": list(random.getstate()[1]) + [random.getstate()[0]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    *internal, version = state["python"]
    random.setstate((version, tuple(internal), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
