"""One process per run folder: a lock file refuses the same command started twice at once.

    with run_lock("outputs/distill-sstkd-..."):   # RunFolderBusy if another live process holds it
        trainer.fit()

The lock is `<run folder>/.segdistill.lock`, created with O_EXCL (atomic on a local or NFS
folder) and holding the owner's host and PID. A lock whose process is gone (same host, PID not
running: a run killed with -9, a machine that rebooted) is stale and taken over with a notice. A
lock from another host cannot be checked from here and is honoured; its message says which file
to delete if that run is known to be dead. Storage on a URI (s3://, gs://) has no atomic create,
so no lock is taken there (documented in the README).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

from components.training.storage import is_uri

LOCK_FILE = ".segdistill.lock"


class RunFolderBusy(RuntimeError):
    """Another live process is running this run (names it and the lock file)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _owner(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # half-written by a process killed between create and write: stale


def _acquire(path: Path) -> None:
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _owner(path)
            pid, host = owner.get("pid"), owner.get("host")
            if host not in (None, me["host"]):
                raise RunFolderBusy(
                    f"{path.parent}: in use by PID {pid} on host {host} (lock {path}); if that "
                    "run is no longer running, delete the lock file and run again"
                ) from None
            if isinstance(pid, int) and pid != me["pid"] and _alive(pid):
                raise RunFolderBusy(
                    f"{path.parent}: in use by PID {pid} (the same run started earlier; lock "
                    f"{path}). Wait for it to finish, or stop it: running this command again "
                    "then resumes from its last checkpoint"
                ) from None
            print(f"run folder lock of PID {pid} is stale (no such process); taking it over")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return
    raise RunFolderBusy(f"{path.parent}: could not take the lock {path}")


@contextlib.contextmanager
def run_lock(run_folder: str):
    """Hold the run folder's lock for the block (no lock on URI storage)."""
    if is_uri(run_folder):
        yield
        return
    path = Path(run_folder) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    _acquire(path)
    try:
        yield
    finally:
        if _owner(path).get("pid") == os.getpid():
            path.unlink(missing_ok=True)
