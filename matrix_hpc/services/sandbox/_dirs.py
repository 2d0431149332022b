"""Where a pool keeps its sandboxes' private directories: one directory per user, one per pool.

Layout: ``<root>/u<uid>/pool-<pid>-<token>/slot<N>.<generation>``. ``<root>`` (default
``$TMPDIR/matrix-hpc-sandboxes``) may be shared by every user of a node: when a pool
creates it, it is made like ``/tmp`` (1777, sticky), so each user adds their own
``u<uid>`` (0700; 0711 where a root pool runs its sandboxes as another uid, which must
pass through) and never reads, sweeps or collides with another user's. A pool holds an
``flock`` on its directory's ``.lock`` while it lives; a later pool of the same user
deletes only directories whose lock is free (their pool is gone), so two runs on one
node, even in different PID namespaces, never delete each other's sandboxes.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path

from .base import SandboxStartError

__all__ = ["PoolDir", "default_root", "user_dir"]

log = logging.getLogger(__name__)

_LOCK = ".lock"


def default_root() -> Path:
    return Path(tempfile.gettempdir()) / "matrix-hpc-sandboxes"


def user_dir(root: Path, mode: int = 0o700) -> Path:
    """``root/u<uid>``, created (and ``root`` with it, 1777) if absent; owned by this user, ``mode``."""
    uid = os.geteuid()
    if not root.exists():
        try:
            root.mkdir(parents=True)
            os.chmod(root, 0o1777)  # shared like /tmp: every user makes their own directory in it
        except FileExistsError:
            pass  # another user's pool made it just now
    mine = root / f"u{uid}"
    try:
        mine.mkdir(mode=mode)
    except FileExistsError:
        pass
    except PermissionError:
        st = root.stat()
        raise SandboxStartError(
            f"sandbox.root_dir {root}: uid {uid} cannot create its directory there (owner uid {st.st_uid}, mode {oct(st.st_mode & 0o7777)}); "
            "make it 1777 like /tmp, or set sandbox.root_dir to a directory of your own"
        ) from None
    st = os.lstat(mine)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
        raise SandboxStartError(
            f"sandbox directory {mine}: expected a directory owned by uid {uid}, found {'one' if stat.S_ISDIR(st.st_mode) else 'something else'} owned by uid {st.st_uid}"
        )
    os.chmod(mine, mode)
    return mine


class PoolDir:
    """One pool's directory, locked for the pool's life; ``sweep`` first deletes dead pools' ones."""

    def __init__(self, root: Path, mode: int = 0o700) -> None:
        self.parent = user_dir(root, mode)
        self.sweep()
        name = f"pool-{os.getpid()}-{secrets.token_hex(4)}"
        # Locked before it gets its name: a sweep never sees a live pool's directory unlocked.
        new = self.parent / f".new-{name}"
        new.mkdir(mode=mode)
        os.chmod(new, mode)
        self._lock_fd: int | None = os.open(new / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.path = new.rename(self.parent / name)

    def sweep(self) -> int:
        """Delete the directories of this user's pools that no longer run; how many."""
        gone = 0
        for entry in self.parent.glob("pool-*"):
            try:
                fd = os.open(entry / _LOCK, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:  # half-made by a pool killed while starting
                fd = None
            except OSError:
                continue
            try:
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its pool lives
            finally:
                if fd is not None:
                    os.close(fd)
            shutil.rmtree(entry, ignore_errors=True)
            gone += 1
        if gone:
            log.info("deleted %d sandbox directories of pools that no longer run, in %s", gone, self.parent)
        return gone

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
