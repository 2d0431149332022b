"""A run's credentials: random secrets kept in files only their owner can read.

A run makes two kinds of secret: the Ray cluster's auth token (Slurm runs; a local run
keeps its token in the environment of its own processes) and the API key of its
managed LLM servers. Each is written to a ``0600`` file in a ``0700`` folder
(the run's or its job folder's secrets folder, named in store/layout.py, on the shared
filesystem every node of a run sees) and handed around by *path*, never by value: a path can be logged,
put in run.json or an actor's arguments; the value goes only into a request header
or the environment of the run's own server processes. Standard library only.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

__all__ = ["new_secret", "new_secret_file", "private_dir", "read_secret", "remove_secret", "wait_secret", "write_secret"]


def new_secret() -> str:
    """256 random bits as hex (what ``ray get-auth-token --generate`` makes)."""
    return secrets.token_hex(32)


def private_dir(folder: str | os.PathLike[str]) -> Path:
    """``folder``, created ``0700`` (and made so if it exists: a group-readable
    project folder must not share what is in it)."""
    folder = Path(folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if folder.stat().st_mode & 0o077:
        os.chmod(folder, 0o700)
    return folder


def write_secret(path: str | os.PathLike[str], value: str) -> Path:
    """Write ``value`` to ``path`` as a ``0600`` file, atomically (a reader on another node
    sees the whole secret or no file). The file is created ``0600``: it is never readable
    by others, not even between its creation and a chmod."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_TRUNC of a leftover temp file keeps its old mode
        os.write(fd, value.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def read_secret(path: str | os.PathLike[str]) -> str:
    """The secret in ``path`` (surrounding whitespace dropped: a key file edited by hand)."""
    value = Path(path).read_text().strip()
    if not value:
        raise ValueError(f"{path} is empty")
    return value


def wait_secret(path: str | os.PathLike[str], timeout_s: float) -> str:
    """:func:`read_secret`, waiting up to ``timeout_s`` for the file to appear (another node
    writes it on a shared filesystem whose lookups may lag); FileNotFoundError names it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return read_secret(path)
        except (FileNotFoundError, ValueError):
            if time.monotonic() > deadline:
                raise FileNotFoundError(f"{path}: not there (or empty) after {timeout_s:.0f}s; it is written by rank 0 on the shared filesystem") from None
            time.sleep(0.5)


def remove_secret(path: str | os.PathLike[str] | None) -> None:
    if path is not None:
        Path(path).unlink(missing_ok=True)


def new_secret_file(path: str | os.PathLike[str]) -> Path:
    """A fresh secret in ``path`` (e.g. ``RunLayout.llm_key``), its folder made ``0700``."""
    path = Path(path)
    private_dir(path.parent)
    return write_secret(path, new_secret())
