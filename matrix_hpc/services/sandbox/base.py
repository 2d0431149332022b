"""The sandbox contract: limits, results, errors, and the runtime interface.

A :class:`SandboxRuntime` (bubblewrap, Apptainer) makes :class:`Sandbox` objects.
A sandbox owns a private host directory, seen inside as ``/sandbox``, that keeps
its files between execs of one lease; every exec runs under :class:`SandboxLimits`
and returns an :class:`ExecResult`, never raising for what the payload did. Between
leases :meth:`Sandbox.reset` makes it as new, or says why only a new one will do.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
import re
import shutil
import signal
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ...config.sandbox import SandboxLimits

__all__ = [
    "ExecResult",
    "LeaseNotFound",
    "RuntimeNotInstalled",
    "Sandbox",
    "SandboxError",
    "SandboxLimits",
    "SandboxRuntime",
    "SandboxStartError",
    "SandboxUnavailable",
    "classify_exit",
    "limit_argv",
    "require_binaries",
    "safe_relpath",
]

log = logging.getLogger(__name__)

SANDBOX_DIR = "/sandbox"  # where the private directory appears inside every sandbox


class SandboxError(RuntimeError):
    """Base of the sandbox errors; ``kind`` is a short category for failed records."""

    kind = "sandbox_error"


class RuntimeNotInstalled(SandboxError):
    """The configured runtime's binary is missing; the message says how to install it."""

    kind = "sandbox_unavailable"


class SandboxStartError(SandboxError):
    """A sandbox could not be started (namespaces refused, image missing, ...)."""

    kind = "sandbox_unavailable"


class SandboxUnavailable(SandboxError):
    """No sandbox became free within the caller's wait limit, or too many callers wait."""

    kind = "sandbox_busy"


class LeaseNotFound(SandboxError):
    """The lease is unknown: released already, or reclaimed (dead holder, TTL)."""

    kind = "sandbox_lease_lost"


@dataclass(slots=True)
class ExecResult:
    """What one command did. ``killed_reason`` is None for a normal exit.

    Reasons: ``wall`` (wall-clock limit), ``cpu``, ``memory`` (an allocation over the
    limit failed), ``fsize``, ``output`` (printed more than ``output_kb``),
    ``signal:N`` (died of another signal), ``cancelled`` (the lease was reclaimed).
    """

    stdout: str
    stderr: str
    exit_code: int
    timed_out: bool = False
    killed_reason: str | None = None
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.killed_reason is None


def limit_argv(limits: SandboxLimits, prlimit: str = "/usr/bin/prlimit") -> list[str]:
    """``prlimit`` in front of the payload, run *inside* the sandbox's user namespace.

    Inside, RLIMIT_NPROC counts only the sandbox's own processes (the kernel counts
    per user namespace and uid), so one sandbox's fork bomb cannot starve another.
    The CPU soft limit sends SIGXCPU (reported as ``cpu``); the hard one, a second
    later, SIGKILLs a process that ignores it.
    """
    mib = 1024 * 1024
    cpu = limits.cpu_seconds
    return [
        prlimit,
        f"--as={limits.memory_mb * mib}",
        f"--cpu={cpu}:{cpu + 1}",
        f"--fsize={limits.fsize_mb * mib}",
        f"--nproc={limits.nproc}",
        "--core=0",
        "--",
    ]


_MEMORY_FAILURE = re.compile(rb"MemoryError|Cannot allocate memory|std::bad_alloc|[Oo]ut of memory|ENOMEM")


def classify_exit(exit_code: int, stderr: bytes, timed_out: bool, output_overflow: bool) -> str | None:
    """Why the payload was stopped, from its exit status (shells report 128+signal)."""
    if timed_out:
        return "wall"
    if output_overflow:
        return "output"
    sig = -exit_code if exit_code < 0 else exit_code - 128 if 128 < exit_code < 128 + 65 else None
    if sig == signal.SIGXCPU:
        return "cpu"
    if sig == signal.SIGXFSZ:
        return "fsize"
    # RLIMIT_AS makes allocations fail rather than killing: the process dies of the
    # failure it reports, so the evidence is on stderr.
    if exit_code != 0 and _MEMORY_FAILURE.search(stderr[-4096:]):
        return "memory"
    if sig is not None:
        return f"signal:{sig}"
    return None


def safe_relpath(path: str) -> PurePosixPath:
    """A path inside ``/sandbox``; absolute paths under it are accepted, escapes are not."""
    p = PurePosixPath(path)
    if p.is_absolute():
        try:
            p = p.relative_to(SANDBOX_DIR)
        except ValueError:
            raise ValueError(f"path {path!r} is outside {SANDBOX_DIR}") from None
    if not p.parts or ".." in p.parts:
        raise ValueError(f"path {path!r} must name a file inside {SANDBOX_DIR}")
    return p


def require_binaries(runtime: str, names: list[str], install_hint: str) -> dict[str, str]:
    """Absolute paths of ``names``; :class:`RuntimeNotInstalled` naming the first missing one."""
    found: dict[str, str] = {}
    for name in names:
        path = shutil.which(name)
        if path is None:
            raise RuntimeNotInstalled(f"sandbox runtime {runtime!r} needs `{name}`, which is not on PATH. {install_hint}")
        found[name] = path
    return found


@dataclass
class Sandbox(abc.ABC):
    """One warm sandbox: a private directory plus whatever the runtime keeps running."""

    slot: int
    workdir: Path
    generation: int = 0
    uses: int = 0
    tainted: bool = False  # a timed-out or killed exec may have left state behind: recycle
    owner_uid: int | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"slot{self.slot}.{self.generation}"

    @abc.abstractmethod
    async def start(self) -> None:
        """Create the private directory and anything long-lived (an instance)."""

    @abc.abstractmethod
    async def exec(self, cmd: str | list[str], limits: SandboxLimits, stdin: bytes | None = None, env: dict[str, str] | None = None) -> ExecResult:
        """Run ``cmd`` (a shell string or an argv) in ``/sandbox`` under ``limits``."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop what :meth:`start` started and delete the private directory."""

    async def reset(self) -> str | None:
        """Between leases: make the sandbox as new (every file the lease wrote gone, every
        process it started dead). None when done; else why the pool must replace it."""
        await asyncio.to_thread(self.wipe)
        return None if not any(self.workdir.iterdir()) else "dirty"

    def wipe(self) -> None:
        """Empty the private directory and give it back its mode (a payload may chmod it)."""
        os.chmod(self.workdir, 0o700)
        for entry in self.workdir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                _rmtree(entry)
            else:
                entry.unlink(missing_ok=True)

    def make_workdir(self) -> None:
        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=False)
        self._chown(self.workdir)

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write a file into the private directory, owned by the sandbox's user."""
        rel = safe_relpath(path)
        parent = self.workdir
        for part in rel.parts[:-1]:
            parent = parent / part
            if parent.is_symlink():  # planted by a payload: never follow it out of the sandbox
                raise ValueError(f"{path}: {part} is a symlink")
            if not parent.exists():
                parent.mkdir()
                self._chown(parent)
        fd = os.open(parent / rel.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK, mode)
        with os.fdopen(fd, "wb") as fh:
            _require_regular(fd, path)
            fh.write(data)
        self._chown(parent / rel.name)

    def _chown(self, path: Path) -> None:
        if self.owner_uid is not None:
            os.lchown(path, self.owner_uid, self.owner_uid)

    def read_file(self, path: str, max_bytes: int = 16 * 1024 * 1024) -> bytes:
        """Read a file the payload wrote; refuses symlinks and files over ``max_bytes``."""
        rel = safe_relpath(path)
        parent = self.workdir
        for part in rel.parts[:-1]:
            parent = parent / part
            if parent.is_symlink():
                raise ValueError(f"{path}: {part} is a symlink")
        # O_NONBLOCK: a FIFO planted under the expected name must not hang the pool.
        fd = os.open(parent / rel.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as fh:
            _require_regular(fd, path)
            data = fh.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ValueError(f"{path} is larger than {max_bytes} bytes")
        return data


def _rmtree(path: Path) -> None:
    """Delete a tree the payload wrote, opening up directories it made unreadable (``chmod 0``) first."""
    try:
        os.chmod(path, 0o700)  # the caller checked it is a directory, not a symlink
    except OSError:
        pass
    for dirpath, dirnames, _ in os.walk(path):  # top-down: each directory is opened before it is entered
        for name in dirnames:
            sub = os.path.join(dirpath, name)
            try:
                if stat.S_ISDIR(os.lstat(sub).st_mode):  # never a symlink: chmod would follow it out
                    os.chmod(sub, 0o700)
            except OSError:
                pass
    shutil.rmtree(path, ignore_errors=True)


def _require_regular(fd: int, path: str) -> None:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise ValueError(f"{path} is not a regular file")


class SandboxRuntime(abc.ABC):
    """Makes sandboxes of one kind. ``check`` raises :class:`RuntimeNotInstalled`."""

    name: str = "abstract"

    @abc.abstractmethod
    def check(self) -> None:
        """Fail fast, with an install hint, when the runtime cannot work here."""

    def sandbox_uid(self) -> int | None:
        """The host uid the sandboxes' processes run as; None: this process's own."""
        return None

    @abc.abstractmethod
    def create(self, slot: int, workdir: Path, generation: int) -> Sandbox:
        """A not-yet-started sandbox whose private directory will be ``workdir``."""

    async def probe(self, sandbox: Sandbox) -> None:
        """Run ``true`` in a started sandbox; :class:`SandboxStartError` with its stderr if it fails."""
        res = await sandbox.exec(["/bin/true"], SandboxLimits(wall_s=30))
        if res.exit_code != 0:
            raise SandboxStartError(f"{self.name} sandbox cannot run /bin/true (exit {res.exit_code}): {res.stderr.strip()[:500]}")
