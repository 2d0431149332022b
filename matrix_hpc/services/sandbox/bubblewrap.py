"""bubblewrap sandboxes: a fresh set of namespaces per exec, a private directory per sandbox.

Each exec is::

    setpriv --pdeathsig KILL [--reuid U --regid U --clear-groups]   # dies with the pool; not root
      timeout -s KILL <wall+grace>                                   # backstop if the pool hangs
        bwrap --unshare-all --die-with-parent --new-session ...       # only `lo`, read-only system
          prlimit --as --cpu --fsize --nproc --                      # set inside the user namespace
            /bin/sh -c CMD

A warm sandbox is its private directory (``/sandbox`` inside, kept between the
execs of a lease); nothing runs between execs, so starting one costs a mkdir.
Everything else the payload can write (``/tmp``, ``/dev/shm``) is a tmpfs of its
exec, and its PID namespace dies with it, taking every process it started along
(setsid, nohup, double forks included). Between leases :meth:`BubblewrapSandbox.reset`
empties ``/sandbox`` (``HOME``) and verifies, by each exec's PID namespace (bwrap's
``--info-fd``), that none of them still runs, killing it if one does.
Host directories in ``bubblewrap.rw_binds`` are shared on purpose and never wiped.
"""

from __future__ import annotations

import asyncio
import glob
import json
import logging
import os
import shlex
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from ...config.sandbox import BubblewrapOptions
from ._proc import run_limited
from .base import (
    SANDBOX_DIR,
    ExecResult,
    Sandbox,
    SandboxLimits,
    SandboxRuntime,
    SandboxStartError,
    limit_argv,
    require_binaries,
)

__all__ = ["BubblewrapOptions", "BubblewrapRuntime", "BubblewrapSandbox"]

log = logging.getLogger(__name__)

INSTALL_HINT = "Install bubblewrap (Debian/Ubuntu: `apt-get install bubblewrap`; RHEL/Rocky: `dnf install bubblewrap`) or set sandbox.runtime: apptainer."
# Read-only host paths every sandbox sees. Merged-/usr systems have /bin etc. as
# symlinks into /usr: they are recreated as symlinks, not bound twice.
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# The few /etc files that programs need to start (dynamic linker, users, Debian's
# alternatives, Python's site config); the rest of the host's /etc stays out.
ETC_PATHS = (
    "/etc/alternatives",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/python3*",
)
_WALL_GRACE_S = 2  # the in-process deadline fires first; `timeout` only backs it up


def _bind_pair(spec: str) -> tuple[str, str]:
    src, _, dst = spec.partition(":")
    return src, dst or src


class BubblewrapRuntime(SandboxRuntime):
    name = "bubblewrap"

    def __init__(self, options: BubblewrapOptions | None = None) -> None:
        self.options = options or BubblewrapOptions()
        self._bins: dict[str, str] = {}
        self._static: list[str] | None = None

    def check(self) -> None:
        self._bins = require_binaries("bubblewrap", ["bwrap", "setpriv", "timeout", "prlimit"], INSTALL_HINT)

    def sandbox_uid(self) -> int | None:
        return self.options.uid if os.geteuid() == 0 else None

    def create(self, slot: int, workdir: Path, generation: int) -> BubblewrapSandbox:
        if not self._bins:
            self.check()
        owner = self.sandbox_uid()
        if owner is not None:
            _check_traversable(workdir.parent, owner)
        return BubblewrapSandbox(slot=slot, workdir=workdir, generation=generation, owner_uid=owner, runtime=self)

    def static_args(self) -> list[str]:
        """The bwrap arguments shared by every exec (computed once: they stat the host)."""
        if self._static is None:
            args = ["--unshare-all", "--die-with-parent", "--new-session", "--hostname", "sandbox", "--clearenv"]
            if self.options.network:
                args.append("--share-net")
            for path in SYSTEM_PATHS:
                if os.path.islink(path):
                    args += ["--symlink", os.readlink(path), path]
                elif os.path.isdir(path):
                    args += ["--ro-bind", path, path]
            for pattern in ETC_PATHS:
                for path in sorted(glob.glob(pattern)):
                    args += ["--ro-bind", path, path]
            for spec in self.options.ro_binds:
                args += ["--ro-bind", *_bind_pair(spec)]
            for spec in self.options.rw_binds:
                args += ["--bind", *_bind_pair(spec)]
            args += ["--proc", "/proc", "--dev", "/dev"]
            for key, value in self.options.env.items():
                args += ["--setenv", key, value]
            args += ["--setenv", "HOME", SANDBOX_DIR, "--setenv", "TMPDIR", "/tmp"]
            self._static = args
        return self._static

    def argv(self, workdir: Path, limits: SandboxLimits, cmd: str | list[str], env: dict[str, str] | None, info_fd: int | None = None) -> list[str]:
        b = self._bins
        argv = [b["setpriv"], "--pdeathsig", "KILL"]
        if os.geteuid() == 0:
            uid = str(self.options.uid)
            argv += ["--reuid", uid, "--regid", uid, "--clear-groups"]
        argv += ["--", b["timeout"], "-s", "KILL", str(int(limits.wall_s) + _WALL_GRACE_S), b["bwrap"], *self.static_args()]
        for key, value in (env or {}).items():
            argv += ["--setenv", key, value]
        if info_fd is not None:
            argv += ["--info-fd", str(info_fd)]  # bwrap writes its sandbox's PID and namespaces there
        argv += [
            "--size", str(limits.tmpfs_mb * 1024 * 1024), "--tmpfs", "/tmp",
            "--bind", str(workdir), SANDBOX_DIR, "--chdir", SANDBOX_DIR,
            "--remount-ro", "/",  # the sandbox's own root: no writes outside /sandbox and /tmp
            "--",
        ]  # fmt: skip
        argv += limit_argv(limits, self._prlimit_inside())
        argv += ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        return argv

    def _prlimit_inside(self) -> str:
        # The host's /usr is the sandbox's /usr, so the host path works inside.
        return self._bins["prlimit"]


def _check_traversable(path: Path, uid: int) -> None:
    """bwrap runs as ``uid`` and must reach the private directory through every parent."""
    for p in [path, *path.parents]:
        st = p.stat()
        if st.st_uid != uid and not st.st_mode & 0o001:
            raise SandboxStartError(
                f"sandbox directory {path}: uid {uid} (sandbox.bubblewrap.uid) cannot enter {p} (mode {oct(st.st_mode & 0o777)}); "
                "put sandbox.root_dir somewhere every parent of which is world-executable, e.g. /tmp/matrix-hpc-sandboxes"
            )


_GRACE_S = 1.0
_KILL_WAIT_S = 5.0


@dataclass
class BubblewrapSandbox(Sandbox):
    runtime: BubblewrapRuntime | None = field(default=None, repr=False)
    execs: list[tuple[int, int]] = field(default_factory=list, repr=False)
    """(host PID, PID namespace) of the init of each exec of this lease (what ``reset`` checks)."""

    async def start(self) -> None:
        self.make_workdir()

    async def exec(self, cmd: str | list[str], limits: SandboxLimits, stdin: bytes | None = None, env: dict[str, str] | None = None) -> ExecResult:
        assert self.runtime is not None
        info_r, info_w = os.pipe()
        try:
            argv = self.runtime.argv(self.workdir, limits, cmd, env, info_fd=info_w)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s: %s", self.name, shlex.join(argv))
            return await run_limited(argv, limits, stdin, pass_fds=(info_w,))
        finally:
            os.close(info_w)
            self._note_exec(info_r)

    def _note_exec(self, info_r: int) -> None:
        try:
            os.set_blocking(info_r, False)  # whatever bwrap wrote is there once it ran; never wait
            raw = os.read(info_r, 1 << 16)
        except BlockingIOError:
            raw = b""
        finally:
            os.close(info_r)
        try:
            info = json.loads(raw)
            self.execs.append((int(info["child-pid"]), int(info["pid-namespace"])))
        except (ValueError, KeyError, TypeError):
            pass  # bwrap did not start (then it ran nothing)

    async def reset(self) -> str | None:
        survivors = await asyncio.to_thread(self._end_survivors)
        if survivors:
            return f"processes: {survivors} left running after {_KILL_WAIT_S:g}s"
        return await super().reset()

    def _end_survivors(self) -> str | None:
        """Kill the init (and so the whole PID namespace) of any exec still running; None once none is."""
        # bwrap returns the payload's status as soon as it exits; its namespace's init ends a
        # moment later (its parent gone, --die-with-parent), taking the rest along: allow that.
        left = _alive(self.execs)
        deadline = time.monotonic() + _GRACE_S
        while left and time.monotonic() < deadline:
            time.sleep(0.005)
            left = _alive(left)
        for pid, _ in left:  # never happens unless a runtime tie broke: say so
            log.warning("%s: an exec's sandbox (pid %d) outlived it by %gs; killing it", self.name, pid, _GRACE_S)
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        deadline = time.monotonic() + _KILL_WAIT_S
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = _alive(left)
        self.execs = left
        return ", ".join(f"pid {pid}" for pid, _ in left) or None

    async def stop(self) -> None:
        await asyncio.to_thread(self._end_survivors)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _alive(execs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(pid, ns) for pid, ns in execs if _in_pid_namespace(pid, ns)]


def _in_pid_namespace(pid: int, ns: int) -> bool:
    """``pid`` is a live (not zombie) process in PID namespace ``ns`` (not a reused PID).

    A namespace's init turns zombie only after every other process in it is gone."""
    try:
        if os.readlink(f"/proc/{pid}/ns/pid") != f"pid:[{ns}]":
            return False
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):  # gone, or another user's process that reused the PID
        return False
    return state not in (b"Z", b"X")
