"""Before a run opens a store: is its previous writer still alive, on whatever host?

The writer of a part is the run's sink actor, which may run on any node. It holds
the part's ``flock`` and a :class:`~matrix_hpc.store.fsutil.WriterLease` (host, pid,
its driver, an expiry it renews). The lease decides, because ``flock`` may not be
shared between hosts on a cluster file system:

* no lock held here and no live lease: nobody writes; go on;
* the lease's driver runs on this host: alive means a live run (refuse); dead means a
  crashed run whose sink Ray is about to kill (wait until the lock and lease are gone);
* otherwise watch the lease: a writer that keeps renewing it is alive (refuse, naming
  its host and pid); one whose lease expires or is released is gone (go on).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path

from ..procs import pid_alive
from .fsutil import LEASE_S, StoreLockedError, WriterLease, WriterLock
from .layout import PartLayout

__all__ = ["wait_for_previous_writer"]

log = logging.getLogger(__name__)

_POLL_S = 0.2


def _gone(lock: Path, lease_path: Path) -> bool:
    """Nobody holds the lock here, and the lease is released, expired, or its writer
    (on this host) has exited."""
    if WriterLock.is_held(lock):
        return False
    lease = WriterLease.read(lease_path)
    return lease is None or not lease.live() or (lease.host == socket.gethostname() and not pid_alive(lease.pid))


def wait_for_previous_writer(part: Path, say: Callable[[str], None], timeout_s: float = 60.0, lease_s: float = LEASE_S) -> None:
    """Return once nobody writes ``part``; raise :class:`StoreLockedError` if a live run does."""
    paths = PartLayout(part)
    lock, lease_path = paths.lock, paths.lease
    if _gone(lock, lease_path):
        return
    lease = WriterLease.read(lease_path)
    here = socket.gethostname()
    if lease is None:  # the lock is held by a writer that wrote no lease (a foreign process)
        raise StoreLockedError(f"{part} is being written by another process (see {lock})")
    if lease.driver_host == here and pid_alive(lease.driver_pid):
        raise StoreLockedError(f"{part.parent} is being written by another run ({lease.describe()})")

    deadline = time.monotonic() + timeout_s
    if lease.driver_host == here:  # the driver is dead: its sink is on the way out
        say(f"waiting for the writer of the previous, crashed run to exit ({lease.describe()})")
        while not _gone(lock, lease_path):
            if time.monotonic() > deadline:
                raise StoreLockedError(f"{part}: the crashed run's writer ({lease.describe()}) still holds it after {timeout_s:.0f}s")
            time.sleep(_POLL_S)
        return

    # The driver is on another host: only the lease can tell. A writer renews it every
    # lease_s / 3; two renewals seen mean it lives (an orphaned sink is killed by Ray
    # within seconds of its driver's death, well before that).
    say(f"checking whether the store's writer is alive ({lease.describe()})")
    first = lease.renewed_at
    renewals = 0
    while not _gone(lock, lease_path):
        cur = WriterLease.read(lease_path)
        if cur is not None and cur.renewed_at != first:
            renewals, first = renewals + 1, cur.renewed_at
            if renewals >= 2:
                raise StoreLockedError(
                    f"{part.parent} is being written by another run ({cur.describe()}; lease renewed {time.time() - cur.renewed_at:.1f}s ago)"
                )
        if time.monotonic() > deadline:
            raise StoreLockedError(f"{part}: its writer ({lease.describe()}) neither renews nor releases its lease after {timeout_s:.0f}s")
        time.sleep(_POLL_S)
    log.info("the previous writer of %s is gone (%s)", part, lease.describe())
