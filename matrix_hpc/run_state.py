"""What ``matrix-hpc status`` may say about a run: only what it can prove.

``run.json`` says what the driver last wrote; a driver killed with SIGKILL (or a
node that died) never writes again, so its ``running`` is stale. The store's writer
lock (an ``flock``, released by the kernel when its holder dies) and the recorded
driver pid are the evidence used here.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .runinfo import RunInfo

__all__ = ["process_running", "run_state"]

_ENDED = {"finished", "interrupted", "aborted", "failed"}


def process_running(pid: int) -> bool:
    """True if ``pid`` is a live process on this host (a zombie is not: it has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True  # exists, unreadable
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def run_state(info: RunInfo, writer_active: bool) -> str:
    """One phrase: ``running now``, ``finished``, ``interrupted``, ``aborted``, ``crashed (...)``."""
    status, pid, host = info.status, info.driver_pid, info.host
    here = host == socket.gethostname() and isinstance(pid, int) and pid > 0
    driver_alive = process_running(pid) if here else None  # type: ignore[arg-type]
    if writer_active:
        if driver_alive is False:
            return f"crashed (driver pid {pid} gone; its writer is still finishing)"
        return "running now"
    if status in _ENDED:
        return {"interrupted": "interrupted (re-run to resume)", "aborted": "aborted (re-run to resume)"}.get(status, status)  # type: ignore[arg-type]
    if driver_alive:
        return "starting" if status == "starting" else "running (no writer holds the store yet)"
    if here:
        return "crashed (writer gone)"
    # Another host: its pid cannot be checked from here, but no process holds the lock.
    return f"crashed or killed (writer gone; it ran on {host})"
