"""Can this process write the output folder? Checked before a run starts anything.

A run that finds out late (after Ray and the LLM engines are up) that its output is
on a read-only filesystem, under a regular file, or somewhere it may not create a
folder fails with a traceback from deep inside zarr. :func:`check_output_writable`
answers up front with one line that names the config key and the reason. The Slurm
launcher calls it too (engineer notes: a multi-node visibility probe is separate).
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from .layout import RunLayout

__all__ = ["OutputPathError", "check_output_writable"]

log = logging.getLogger(__name__)


class OutputPathError(RuntimeError):
    """The output folder cannot be created or written; the message names the key."""


def _reason(exc: OSError) -> str:
    if exc.errno == errno.EROFS:
        return "read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    return (exc.strerror or str(exc)).lower()


def check_output_writable(path: str | os.PathLike[str], key: str = "output.path") -> Path:
    """Create ``path`` if needed and prove a file can be written in it (and in any
    existing store part); return the resolved path or raise :class:`OutputPathError`."""
    root = Path(os.path.expanduser(path)).resolve()
    # Name the component in the way: a regular file where a folder must be.
    for parent in [root, *root.parents]:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                what = "is" if parent == root else f"is under {parent}, which is"
                raise OutputPathError(f"{key}: {root} {what} a file, not a folder")
            break
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"{key}: cannot create {root}: {_reason(exc)}") from None
    # A resumed store is written in its parts and run.json; probe the folders a run writes.
    folders = [root, *(p.dir for p in RunLayout(root).parts())]
    for folder in folders:
        probe = folder / f".write-probe-{os.getpid()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"ok")
            finally:
                os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            where = "" if folder == root else f" (in {folder.name})"
            raise OutputPathError(f"{key}: cannot write to {root}{where}: {_reason(exc)}") from None
    return root
