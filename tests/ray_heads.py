"""Helpers for tests that start their own Ray head with `ray start --head` (job submission,
autoscaling): ports, a token-authenticated environment, and stopping only that head's process
session (never `ray stop`, which would stop every Ray instance of this user)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import sys
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def token_env(tmp: Path, **extra: str) -> dict[str, str]:
    """This process's environment without RAY_ADDRESS, with token authentication (a fresh token
    in `tmp`), as a head should run: the job CLI and drivers send that token."""
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), **extra)
    return env


def session_members(sid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields 3 and 6 of /proc/PID/stat: the state (Z: exited, not yet reaped) and session
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(stat.parent.name))
    return pids


def stop_session(sid: int) -> list[int]:
    """SIGTERM, then SIGKILL, every process of the head's session; returns any survivors."""
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
        for pid in session_members(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while session_members(sid) and time.monotonic() < deadline:
            time.sleep(0.5)
    return session_members(sid)


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
