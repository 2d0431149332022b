"""How the nodes of one allocation learn the Ray head's address, and when to stop.

Rank 0 publishes ``{"address": ...}``; every other rank waits for it. Under MPI
(``srun --mpi=pmi2``, ``mpirun``) the address travels by an ``mpi4py`` broadcast;
otherwise through a file in the job directory, written atomically, keyed by job
id and restart count so a requeued job never reads its previous life's head.
The end of the run is always a file (``done``): an MPI collective would keep
the waiting ranks spinning on a CPU for the whole run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ...store.fsutil import atomic_write_json

__all__ = ["Rendezvous", "mpi_world", "under_mpi"]

log = logging.getLogger(__name__)

_MPI_ENV = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_SIZE")


def under_mpi() -> bool:
    """True when an MPI launcher started this process (srun --mpi=..., mpirun)."""
    return any(k in os.environ for k in _MPI_ENV)


def mpi_world() -> Any:
    from mpi4py import MPI  # imported only under MPI: it initialises MPI on import

    return MPI.COMM_WORLD


_BCAST_BYTES = 4096  # room for the head's JSON; a fixed size lets every rank post the same buffer


def _bcast_with_deadline(comm: Any, value: dict[str, Any] | None, rank: int, timeout_s: float) -> dict[str, Any]:
    """Broadcast rank 0's JSON-able ``value``; other ranks give up after ``timeout_s``.

    A blocking ``bcast`` spins a CPU forever when rank 0 died before sending
    (MPI init failed there, or its node was lost); polling a non-blocking
    ``Ibcast`` lets this rank fail with a message instead, which ends the step.
    """
    buf = bytearray(_BCAST_BYTES)
    if rank == 0:
        data = json.dumps(value).encode()
        if len(data) >= _BCAST_BYTES:
            raise ValueError(f"head info is {len(data)} bytes; the MPI rendezvous carries at most {_BCAST_BYTES - 1}")
        buf[: len(data)] = data
    req = comm.Ibcast(buf, root=0)
    deadline = time.monotonic() + timeout_s
    while not req.Test():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: no head address from rank 0 by MPI broadcast after {timeout_s:.0f}s")
        time.sleep(0.05)
    return json.loads(bytes(buf).rstrip(b"\0"))


class Rendezvous:
    def __init__(self, folder: str | os.PathLike[str], rank: int, size: int, mode: str = "auto") -> None:
        self.folder = Path(folder)
        self.rank, self.size = rank, size
        self.mode = "mpi" if mode == "mpi" or (mode == "auto" and under_mpi()) else "file"
        self.folder.mkdir(parents=True, exist_ok=True)

    @property
    def _head_file(self) -> Path:
        return self.folder / "head.json"

    @property
    def _done_file(self) -> Path:
        return self.folder / "done"

    def exchange(self, head: dict[str, Any] | None, timeout_s: float) -> dict[str, Any]:
        """Rank 0 passes its head info and gets it back; every other rank receives it."""
        if self.mode == "mpi":
            comm = mpi_world()
            if comm.Get_size() != self.size:
                raise RuntimeError(f"MPI world has {comm.Get_size()} ranks, the allocation {self.size} tasks")
            info = _bcast_with_deadline(comm, head if self.rank == 0 else None, self.rank, timeout_s)
            log.info("rank %d got the head address by MPI broadcast: %s", self.rank, info["address"])
            return dict(info, via="mpi")
        if self.rank == 0:
            assert head is not None
            atomic_write_json(self._head_file, head, durable=False)
            return dict(head, via="file")
        deadline = time.monotonic() + timeout_s
        while not self._head_file.is_file():
            if self.finished():  # rank 0 failed before publishing: do not wait out the timeout
                raise RuntimeError(f"rank {self.rank}: rank 0 ended before publishing the head address (see its log)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {self.rank}: no head address in {self._head_file} after {timeout_s:.0f}s")
            time.sleep(0.2)
        return dict(json.loads(self._head_file.read_text()), via="file")

    def finish(self) -> None:
        """Rank 0: the run is over; every node may stop its Ray."""
        self._done_file.touch()

    def finished(self) -> bool:
        return self._done_file.exists()
