"""bubblewrap sandboxes: a fresh set of namespaces per exec, a private directory per sandbox.

Each exec is::

    setpriv --pdeathsig KILL [--reuid U --regid U --clear-groups]   # dies with the pool; not root
      timeout -s KILL <wall+grace>                                   # backstop if the pool hangs
        bwrap --unshare-all --die-with-parent --new-session ...       # only `lo`, read-only system
          prlimit --as --cpu --fsize --nproc --                      # set inside the user namespace
            /bin/sh -c CMD

A warm sandbox is its private directory (``/sandbox`` inside, kept between the
execs of a lease); nothing runs between execs, so starting one costs a mkdir.
"""

from __future__ import annotations

import glob
import logging
import os
import shlex
import shutil
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

    def create(self, slot: int, workdir: Path, generation: int) -> BubblewrapSandbox:
        if not self._bins:
            self.check()
        owner = self.options.uid if os.geteuid() == 0 else None
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

    def argv(self, workdir: Path, limits: SandboxLimits, cmd: str | list[str], env: dict[str, str] | None) -> list[str]:
        b = self._bins
        argv = [b["setpriv"], "--pdeathsig", "KILL"]
        if os.geteuid() == 0:
            uid = str(self.options.uid)
            argv += ["--reuid", uid, "--regid", uid, "--clear-groups"]
        argv += ["--", b["timeout"], "-s", "KILL", str(int(limits.wall_s) + _WALL_GRACE_S), b["bwrap"], *self.static_args()]
        for key, value in (env or {}).items():
            argv += ["--setenv", key, value]
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


@dataclass
class BubblewrapSandbox(Sandbox):
    runtime: BubblewrapRuntime | None = field(default=None, repr=False)

    async def start(self) -> None:
        self.make_workdir()

    async def exec(self, cmd: str | list[str], limits: SandboxLimits, stdin: bytes | None = None, env: dict[str, str] | None = None) -> ExecResult:
        assert self.runtime is not None
        argv = self.runtime.argv(self.workdir, limits, cmd, env)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: %s", self.name, shlex.join(argv))
        return await run_limited(argv, limits, stdin)

    async def stop(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
