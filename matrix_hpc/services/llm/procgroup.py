"""A server's process group: its members, stopping it, and a reaper that outlives its starter.

vLLM's API server forks an engine core, which forks the model worker(s); when the API server
dies without shutting them down (SIGKILL, or a SIGTERM it does not get through), they are
re-parented to init and keep their RAM or GPU for good. The replica actor stops the whole
group when it stops or restarts the server, or finds it dead. But when the actor itself is
killed (a run's driver killed or lost, a run ended by a kill), nothing of it runs: the API
server gets ``PR_SET_PDEATHSIG``'s SIGTERM, and its engine core was seen to outlive it
(two orphaned engines, 1.9 GB each, kept a test machine busy for the rest of its run).

So each server's group gets a **reaper**: this module run as a process of its own session
(a kill of the run's process group does not reach it), with ``PR_SET_PDEATHSIG`` set by the
thread that started the server. When that thread's process dies, the kernel sends the reaper
SIGTERM, and it stops the group: SIGTERM, then SIGKILL after a grace period, then unlinks the
shared memory the group had mapped. The server's own stop ends the reaper with SIGTERM too
(the group is gone by then), and a reaper whose group has ended on its own exits.

    python -m matrix_hpc.services.llm.procgroup PGID GRACE_S

Read from ``/proc``: no psutil on compute nodes, and the reaper imports nothing else.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable

__all__ = ["group_members", "reap", "shm_files", "stop_group", "unlink"]

log = logging.getLogger(__name__)

_SHM = "/dev/shm/"


def group_members(pgid: int) -> list[int]:
    """Pids of live (not zombie) processes in process group ``pgid``."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def _wait_group_gone(pgid: int, deadline: float) -> bool:
    while group_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def shm_files(pids: Iterable[int]) -> set[str]:
    """Shared-memory files (``/dev/shm/psm_*``, ``sem.mp-*``) the processes have mapped."""
    files: set[str] = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as fh:
                for line in fh:
                    parts = line.split(None, 5)  # address perms offset dev inode [path]
                    path = parts[5].strip() if len(parts) == 6 else ""
                    if path.startswith(_SHM) and not path.endswith(" (deleted)"):
                        files.add(path)
        except OSError:
            continue
    return files


def stop_group(pgid: int, grace_s: float, leader: subprocess.Popen[bytes] | None = None) -> bool:
    """SIGTERM process group ``pgid``; after ``grace_s``, SIGKILL it. True when SIGTERM sufficed.

    SIGTERM first even for orphans: Python's resource tracker (in the group; it
    ignores SIGTERM) frees vLLM's shared memory once the others have exited.
    After a SIGKILL nothing does, so what the group had mapped is unlinked here;
    ``/dev/shm`` is RAM, with files of ~400 MB per server.
    """
    if (leader is not None and leader.poll() is None) or group_members(pgid):
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            return True
    deadline = time.monotonic() + grace_s
    if leader is not None:
        try:
            leader.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    if _wait_group_gone(pgid, max(deadline, time.monotonic() + 1.0)):
        return True
    shm = shm_files(group_members(pgid))
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _wait_group_gone(pgid, time.monotonic() + 10.0)
    unlink(shm)
    return False


def unlink(paths: Iterable[str]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.debug("could not unlink %s: %s", path, exc)


def reap(pgid: int, grace_s: float, check_s: float = 5.0) -> None:
    """Wait for SIGTERM (the starter's death through ``PR_SET_PDEATHSIG``, or the server's own
    stop), then stop group ``pgid``; return early once the group has ended on its own."""
    termed = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: termed.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C goes to the run, which stops the group
    while not termed.wait(check_s):
        if not group_members(pgid):
            return
    if not stop_group(pgid, grace_s):
        print(f"reaper: process group {pgid} did not stop within {grace_s:g}s of SIGTERM; killed it", file=sys.stderr)


if __name__ == "__main__":
    reap(int(sys.argv[1]), float(sys.argv[2]))
