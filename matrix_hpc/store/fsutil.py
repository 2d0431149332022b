"""Durable file primitives: fsync, atomic replace, and an exclusive writer lock."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .layout import PartLayout

__all__ = ["LEASE_S", "fsync_path", "atomic_write_json", "read_json", "WriterLease", "WriterLock", "StoreLockedError"]


class StoreLockedError(RuntimeError):
    """Another live process holds the store's writer lock."""


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file or a directory (directories make renames durable)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: Path, data: Any, durable: bool = True) -> None:
    """Write JSON so a reader sees the old or the new file, never a torn one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not keep a torn temp file
        raise
    if durable:
        fsync_path(path.parent)


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default


class WriterLock:
    """An ``flock`` on a file: at most one live writer per store part.

    The kernel drops the lock when its holder dies, so a SIGKILLed writer never
    leaves a stale lock behind (on NFS/Lustre this needs ``flock`` support).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreLockedError(f"{self.path.parent} is being written by another process ({holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def is_held(path: Path) -> bool:
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False


LEASE_S = 15.0
"""How long a writer's lease stays valid without renewal (the sink renews it every LEASE_S / 3)."""


@dataclass
class WriterLease:
    """Who writes a store part, on which host, until when: a file next to the lock.

    ``flock`` says *that* someone holds the part, but only to processes that share the
    lock manager (on a cluster's shared file system, maybe not across hosts), and it
    cannot name the holder's host. The lease does both: the writer (the sink) writes it
    when it takes the lock, renews it while it lives and marks it released before it
    lets the lock go, so anyone on any host can tell a live writer from a dead one.
    """

    host: str
    pid: int
    run_id: str
    driver_host: str
    driver_pid: int
    renewed_at: float
    expires_at: float
    released: bool = False

    def live(self, now: float | None = None) -> bool:
        return not self.released and (now if now is not None else time.time()) < self.expires_at

    def describe(self) -> str:
        return f"sink pid {self.pid} on {self.host}, run {self.run_id}, driver pid {self.driver_pid} on {self.driver_host}"

    @staticmethod
    def path_for(lock: Path) -> Path:
        """The lease next to the part's lock."""
        return PartLayout(lock.parent).lease

    @classmethod
    def read(cls, path: Path) -> WriterLease | None:
        try:
            data = read_json(path)
            return cls(**data) if isinstance(data, dict) else None
        except (OSError, ValueError, TypeError):  # torn or foreign: treat as no lease
            return None

    def write(self, path: Path) -> None:
        atomic_write_json(path, asdict(self), durable=False)

    def renew(self, path: Path, lease_s: float = LEASE_S) -> None:
        self.renewed_at = time.time()
        self.expires_at = self.renewed_at + lease_s
        self.write(path)
