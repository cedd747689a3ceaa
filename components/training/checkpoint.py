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


def _atomic_torch_save(obj: Any, path: Path) -> None:
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
        _atomic_torch_save(obj, folder / name)
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
    if size != expected["bytes"] or _sha256(path) != expected["sha256"]:
        raise CheckpointError(
            f"{path}: truncated or corrupted ({size} bytes, meta.json says {expected['bytes']})"
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


def checkpoint_folders(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders under a run folder, oldest first (by the iteration in meta.json)."""
    found = [p.parent for p in Path(run_dir).rglob(META_FILE)]
    return sorted(found, key=lambda p: (read_meta(p).get("progress", {}).get("iteration", -1), p))


def verify_files(folder: str | Path) -> None:
    """Raise CheckpointError unless every file meta.json lists has its size and SHA-256."""
    folder = Path(folder)
    meta = read_meta(folder)
    for name, expected in meta.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        _check_file(path, expected)


def latest_resumable(run_dir: str | Path) -> Path | None:
    """The newest checkpoint folder of a run that holds a full training state and passes
    `verify_files`, or None. Folders that fail (a copy cut short by a kill) are skipped."""
    for folder in reversed(checkpoint_folders(run_dir)):
        if STATE_FILE not in read_meta(folder).get("files", {}):
            continue
        try:
            verify_files(folder)
        except CheckpointError:
            continue
        return folder
    return None


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
    folders = checkpoint_folders(path)
    if not folders:
        raise CheckpointError(f"{path}: no complete checkpoint (a folder with {META_FILE}) inside")
    return folders[-1]


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
