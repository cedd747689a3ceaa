"""Shared by the entry scripts: import path, Ray start-up, error reporting."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# `python pipelines/x.py` puts pipelines/ first on sys.path; the project root must be there too
# (under `ray job submit --working-dir .` the package may not be installed on the head node).
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def init_ray() -> None:
    """Connect to the cluster of RAY_ADDRESS / the submitted job / a local `ray start`, or else
    start a local instance sized by Ray from this machine (no dashboard: on a laptop it only
    takes CPU from training; start one with `ray start --head` to have it)."""
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"))
    except ConnectionError:
        ray.init(include_dashboard=False)


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code
