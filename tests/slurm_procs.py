"""Processes of the test Slurm cluster's hosts: the daemons it runs, each node's PID 1 and
namespace set-up, and finding (and killing) every process of a node.

Helpers of ``tests/slurm_cluster.py``; no Slurm knowledge here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

__all__ = ["NODE_INIT", "NODE_SETUP", "Daemon", "alive", "mnt_ns", "pids_in_mnt_ns", "pids_in_pidns", "tail", "terminate"]


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return f"--- {path} (last {lines} lines) ---\n" + "\n".join(text.splitlines()[-lines:])


def pid_state(pid: int) -> str | None:
    """The /proc state letter, or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def alive(pid: int) -> bool:
    state = pid_state(pid)
    return state is not None and state not in ("Z", "X")


# PID 1 of a node's PID namespace: runs slurmd, forwards signals to it, reaps orphans (Ray's,
# slurmstepd's), and exits with it, which makes the kernel kill everything left in the node.
NODE_INIT = r"""
import os, signal, sys
child = os.fork()
if child == 0:
    os.execv(sys.argv[1], sys.argv[1:])
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, lambda sig, _f: os.kill(child, sig))
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        sys.exit(0)
    if pid == child:
        sys.exit(os.waitstatus_to_exitcode(status))
"""

# Runs in the node's new namespaces before the init: hostname, hosts file, its own boot id
# (UCX and others take the same boot id for the same machine and then try shared memory),
# private /tmp (a fresh tmpfs, built at a staging mount point, the shared dirs bound into
# it, then moved over /tmp) and private /dev/shm.
NODE_SETUP = r"""
set -e
hostname "$1"; mount --bind "$2" /etc/hosts; mount --bind "$3" /proc/sys/kernel/random/boot_id; stage="$4"; shift 4
mount -t tmpfs -o mode=1777 tmpfs "$stage"
while [ "$1" != "--" ]; do mkdir -p "$stage${1#/tmp}"; mount --bind "$1" "$stage${1#/tmp}"; shift; done; shift
mount --move "$stage" /tmp
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
exec "$@"
"""


class Daemon:
    def __init__(self, name: str, proc: subprocess.Popen, logs: list[Path]) -> None:
        self.name, self.proc, self.logs = name, proc, logs
        self.mnt_ns: str | None = None  # set for slurmd: its private mount namespace
        self.init_pid: int | None = None  # set for slurmd: PID 1 of its node (host pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None and alive(self.proc.pid)

    def tails(self) -> str:
        return "\n".join(tail(p) for p in self.logs)


def terminate(daemons: list[Daemon], grace: float = 10) -> None:
    """SIGTERM, wait up to ``grace`` s, SIGKILL; a zombie counts as gone (reaped here)."""
    for d in daemons:
        if d.alive():
            with contextlib.suppress(ProcessLookupError):
                d.proc.send_signal(signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end and any(d.alive() for d in daemons):
        time.sleep(0.05)
    for d in daemons:
        if d.alive():
            with contextlib.suppress(ProcessLookupError):
                d.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            d.proc.wait(5)


def mnt_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def pids_in_mnt_ns(ns: str) -> list[int]:
    own = mnt_ns(os.getpid())
    if ns == own:
        return []
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and mnt_ns(int(p)) == ns and alive(int(p))]


def pids_in_pidns(init_pid: int) -> list[int]:
    try:
        ns = os.readlink(f"/proc/{init_pid}/ns/pid_for_children")
    except OSError:
        return []
    out = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{p}/ns/pid") == ns and alive(int(p)):
                out.append(int(p))
    return out
