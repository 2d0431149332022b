"""Process helpers shared by every layer (standard library only)."""

from __future__ import annotations

import os

__all__ = ["pid_alive", "process_age_s"]


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists on this host (zombies included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def process_age_s() -> float | None:
    """Seconds since this process started (Linux's /proc), imports and all; None elsewhere."""
    try:
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
