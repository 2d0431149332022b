"""What every node checks when a life of the job starts: does it see the same ``output.path``?

The store, the job directory and the file rendezvous all live under ``output.path``:
a node-local path (a node's /tmp, a scratch disk) gives each node its own copy and
a run that waits, or worse writes, where the others cannot look. So each node writes
a probe file there and reads it back; rank 0 waits for every rank's file and every
other rank for rank 0's, and a node that cannot see them stops with one line naming
itself (or, on rank 0, the nodes whose files never came).

A shared filesystem whose locks are node-local (Lustre ``localflock``, NFS
``local_lock=flock|all`` or ``nolock``) makes the store's single-writer ``flock``
hold on one node only: a warning says so.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

from ...store.layout import RunLayout

__all__ = ["SharedPathError", "cleanup_temp_dirs", "node_local_locks", "probe_shared_path"]

log = logging.getLogger(__name__)


class SharedPathError(RuntimeError):
    """``output.path`` is not the same directory on every node of the allocation."""


def _expected_hosts() -> list[str] | None:
    """The allocation's host names (``scontrol show hostnames``), or None when unknown."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        return None
    try:
        res = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.split() if res.returncode == 0 else None


def probe_shared_path(path: Path, key: str, rank: int, size: int, host: str, timeout_s: float) -> Path:
    """Write ``<path>/.nodes/<key>/rank<R>-<host>``, read it back, and wait (up to ``timeout_s``)
    until rank 0 sees every rank's file and every other rank sees rank 0's; else raise
    :class:`SharedPathError` naming the node. Returns the probe folder (rank 0 removes it)."""
    folder = RunLayout(path).node_probe(key)
    folder.mkdir(parents=True, exist_ok=True)
    mine = folder / f"rank{rank}-{host}"
    token = secrets.token_hex(8)
    mine.write_text(token)
    if mine.read_text() != token:
        raise SharedPathError(f"output.path {path}: node {host} read back another content from {mine}")
    deadline = time.monotonic() + timeout_s
    while True:
        names = [p.name for p in folder.iterdir()]
        seen = {n.split("-", 1)[0]: n.split("-", 1)[1] for n in names if n.startswith("rank") and "-" in n}
        if rank == 0 and len(seen) >= size:
            return folder
        if rank != 0 and "rank0" in seen:
            return folder
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if rank != 0:
        raise SharedPathError(
            f"output.path {path} is not visible from node {host}: rank 0's probe file never appeared in {folder} "
            f"({timeout_s:.0f}s); put output.path on a filesystem every node mounts"
        )
    expected = _expected_hosts()
    missing = sorted(set(expected) - set(seen.values())) if expected and len(expected) == size else []
    who = ", ".join(missing) if missing else f"{size - len(seen)} of {size} ranks"
    raise SharedPathError(
        f"output.path {path} is not visible from node(s) {who}: their probe files never appeared in {folder} "
        f"({timeout_s:.0f}s); put output.path on a filesystem every node mounts"
    )


def _mount_of(path: Path, mounts: str) -> tuple[str, str, str] | None:
    """(mount point, fs type, options) of the mount holding ``path``: the longest matching mount point."""
    best: tuple[str, str, str] | None = None
    target = str(path.resolve())
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        point = parts[1].replace("\\040", " ")
        if target == point or target.startswith(point.rstrip("/") + "/"):
            if best is None or len(point) >= len(best[0]):
                best = (point, parts[2], parts[3])
    return best


def node_local_locks(path: Path, mounts: str | None = None) -> str | None:
    """Why ``flock`` on ``path`` only excludes writers on this node (None when it does not).

    ``mounts`` is ``/proc/mounts``'s text (read when None)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    found = _mount_of(path, mounts)
    if found is None:
        return None
    point, fstype, options = found
    opts = set(options.split(","))
    if fstype == "lustre" and "localflock" in opts:
        why = "localflock"
    elif fstype.startswith("nfs") and ({"nolock", "local_lock=flock", "local_lock=all"} & opts):
        why = sorted({"nolock", "local_lock=flock", "local_lock=all"} & opts)[0]
    else:
        return None
    return f"{point} ({fstype}) is mounted with {why}"


def cleanup_temp_dirs(job_id: str, restart: int, keep_current: bool) -> list[str]:
    """Remove this node's Ray temp dirs of ``job_id``: ``/tmp/mhpc-<job>.<r>`` for earlier lives
    (a life that was SIGKILLed could not remove its own), and this life's unless ``keep_current``."""
    removed = []
    for d in Path("/tmp").glob(f"mhpc-{job_id}.*"):
        r = d.name.rsplit(".", 1)[1]
        if r.isdigit() and (int(r) < restart or (int(r) == restart and not keep_current)):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    return removed
