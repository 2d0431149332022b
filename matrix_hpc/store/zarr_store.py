"""Checkpointed, resumable output: records in zarr, committed exactly once.

The store's files (``store.json``; per part ``data.zarr``, ``commit.json``, ``writer.lock``,
``writer.lease``) are named in :mod:`matrix_hpc.store.layout`, with every other path of a run.

Why it is exactly once (see DESIGN.md's zarr facts): each part has one writer
(the lock); the writer keeps the last, partly filled chunk in memory and always
writes whole chunks (zarr's chunk write is an atomic rename); it fsyncs the
chunks *before* it atomically replaces ``commit.json``, the only thing readers
trust. A crash between the two leaves uncommitted rows past ``rows`` that the
next writer overwrites. The writer refuses an id it already holds, except the retry of
a failed record (:mod:`.latest`: the new row replaces it for every reader; both stay).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync as zarr_sync

from .fsutil import LEASE_S, StoreLockedError, WriterLease, WriterLock, atomic_write_json, fsync_path, read_json
from .latest import REPLACES, ResumeState, current_mask, resume_state
from .layout import PartLayout, RunLayout
from .record_row import NUM_COLUMNS, STR_COLUMNS, RecordRow, WriterOwner

__all__ = ["RecordRow", "StoreWriter", "WriterOwner", "StoreReader", "StoreLockedError", "StoreError"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_FILL = {REPLACES: -1}  # a store made before the column: its rows replace nothing
_GROW_CHUNKS = 16  # capacity grows 16 chunks at a time: few metadata rewrites
# The writer rewrites the tail chunk that already holds committed rows: that is safe only
# if a chunk write is atomic, which zarr's LocalStore does since 3.1.3 (zarr-python #3412).
MIN_ZARR = (3, 1, 3)


def _zarr_version() -> tuple[int, ...]:
    return tuple(int(p) for p in zarr.__version__.split("+")[0].split(".")[:3] if p.isdigit())


class StoreError(RuntimeError):
    """The output folder is missing or not a matrix-hpc store."""


def init_store(root: Path, chunk_rows: int) -> dict[str, Any]:
    """Create the output folder (or check an existing one) and return store.json."""
    root.mkdir(parents=True, exist_ok=True)
    meta_path = RunLayout(root).store_json
    meta = read_json(meta_path)
    if meta is None:
        meta = {"format": "matrix-hpc", "version": FORMAT_VERSION, "chunk_rows": chunk_rows, "created_at": time.time()}
        atomic_write_json(meta_path, meta)
    elif meta.get("format") != "matrix-hpc":
        raise StoreError(f"{root}: store.json is not a matrix-hpc store")
    return meta


class StoreWriter:
    """The single writer of one part. ``append`` buffers, ``commit`` makes it durable.

    It writes only while it holds the part's lock: after :meth:`close` every write
    raises, so a closed writer can never race the next run's writer.
    """

    def __init__(self, root: str | Path, part: int = 0, chunk_rows: int = 256, fsync: bool = True, owner: WriterOwner | None = None) -> None:
        self.root = Path(root)
        meta = init_store(self.root, chunk_rows)
        self.chunk_rows = int(meta["chunk_rows"])  # an existing store keeps its chunking
        self.fsync = fsync
        self.paths = RunLayout(self.root).part(part)
        self.dir = self.paths.dir
        self.dir.mkdir(exist_ok=True)
        self._lock = WriterLock(self.paths.lock)
        self._lock.acquire()
        owner = owner or WriterOwner()
        self._start_rows = owner.start_rows
        now = time.time()
        self._lease = WriterLease(socket.gethostname(), os.getpid(), owner.run_id, owner.driver_host, owner.driver_pid, now, now + LEASE_S)
        self.lease_path = self.paths.lease
        try:
            try:
                self._lease.write(self.lease_path)
            except OSError as exc:  # a full disk must not stop a (re)started writer: the lock
                # alone keeps it the only writer here; renew_lease() writes the lease once it can
                log.warning("cannot write the lease %s yet (%s); the writer renews it when it can", self.lease_path, exc)
            self._open()
        except BaseException:
            self._lock.release()
            raise

    @property
    def holds_lock(self) -> bool:
        return self._lock.held

    def renew_lease(self) -> None:
        """Tell other hosts this writer is alive (call at least every ``LEASE_S / 3``)."""
        if self._lock.held:
            self._lease.renew(self.lease_path)

    def _open(self) -> None:
        if _zarr_version() < MIN_ZARR:
            raise StoreError(f"zarr {zarr.__version__} rewrites chunks in place (not atomically); matrix-hpc needs zarr >= {'.'.join(map(str, MIN_ZARR))}")
        for leftover in self.dir.rglob("*.partial"):  # a killed zarr write
            leftover.unlink(missing_ok=True)
        path = self.paths.data
        if self.paths.has_data:
            group = zarr.open_group(str(path), mode="r+")
        else:
            group = zarr.open_group(str(path), mode="w")
            shape, chunks = (0,), (self.chunk_rows,)
            for name in STR_COLUMNS:
                group.create_array(name, shape=shape, chunks=chunks, dtype=str)
            for name, dtype in NUM_COLUMNS.items():
                group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=_FILL.get(name, 0))
        if REPLACES not in group:  # a store made before retries: add the column (its fill: "replaces none")
            cap = max(group[name].shape[0] for name in (*STR_COLUMNS, *NUM_COLUMNS) if name in group)
            group.create_array(REPLACES, shape=(cap,), chunks=(self.chunk_rows,), dtype="int64", fill_value=-1)
        self._arrays = {name: group[name] for name in (*STR_COLUMNS, *NUM_COLUMNS)}
        self._repair_resize()
        self.rows = int(read_json(self.paths.commit, {"rows": 0})["rows"])
        self._load_ids()
        # The committed rows of the last, partly filled chunk: rewritten whole on the next commit.
        tail_start = self.rows - self.rows % self.chunk_rows
        self._tail = self._read_rows(tail_start, self.rows)
        self._pending: list[RecordRow] = []
        log.info("opened %s: %d committed rows", self.dir, self.rows)

    def _load_ids(self) -> None:
        """Every id of the committed rows, and which ids' current record is failed (and where)."""
        n = self.rows
        ids = list(map(str, self._arrays["id"][:n].tolist())) if n else []
        status = self._arrays["status"][:n].tolist() if n else []
        replaces = self._arrays[REPLACES][:n] if n else np.zeros(0, np.int64)
        self.ids: set[str] = set(ids)
        mask = current_mask(replaces)
        current = n if mask is None else int(mask.sum())
        for row, old in enumerate(replaces.tolist() if bool((replaces >= 0).any()) else ()):
            if old >= 0 and (old >= row or ids[old] != ids[row] or status[old] != "failed"):
                raise StoreError(f"{self.dir}: row {row} ({ids[row]!r}) replaces row {old}, which is not a failed record of that id")
        if len(self.ids) != current:
            raise StoreError(f"{self.dir}: committed rows hold duplicate ids")
        # id -> row of its current record, for ids whose current record is failed (what a retry replaces)
        self._failed: dict[str, int] = {ids[i]: i for i in range(n) if status[i] == "failed" and (mask is None or mask[i])}
        start = n if self._start_rows is None else min(n, self._start_rows)
        self._awaiting = {rid for rid, row in self._failed.items() if row < start}
        self._accepted = n  # rows accepted so far: the row the next accepted one will have

    def _repair_resize(self) -> None:
        """Give every array the same length: a writer killed inside a multi-array
        resize leaves some longer than others. Rows past ``commit.json`` are not
        trusted anyway, so growing the short ones is always safe."""
        shapes = {name: arr.shape[0] for name, arr in self._arrays.items()}
        cap = max(shapes.values())
        for name, arr in self._arrays.items():
            if shapes[name] < cap:
                log.warning("%s: repairing a torn resize (%s has %d rows of capacity, others %d)", self.dir, name, shapes[name], cap)
                arr.resize((cap,))

    def _read_rows(self, lo: int, hi: int) -> list[RecordRow]:
        if hi <= lo:
            return []
        cols = {name: arr[lo:hi].tolist() for name, arr in self._arrays.items()}
        return [RecordRow(**{name: cols[name][i] for name in cols}) for i in range(hi - lo)]

    def columns(self, lo: int, hi: int, names: Iterable[str]) -> dict[str, list[Any]]:
        """Columns ``names`` of the committed rows ``lo:hi``."""
        return {name: self._arrays[name][lo:hi].tolist() if hi > lo else [] for name in names}

    def append(self, rows: list[RecordRow]) -> list[str]:
        """Buffer rows for the next commit; returns ids refused as duplicates.

        A row is accepted when its id has no record yet, or, for a retry (``replaces`` >= 0),
        when the row it replaces is still its id's current record and failed: so a copy of a
        task, a retry's included, is refused once one of them is accepted."""
        dup = []
        for row in rows:
            fresh = row.id not in self.ids if row.replaces < 0 else self._failed.get(row.id) == row.replaces
            if not fresh:
                dup.append(row.id)
                continue
            self.ids.add(row.id)
            self._awaiting.discard(row.id)
            if row.status == "failed":
                self._failed[row.id] = self._accepted
            else:
                self._failed.pop(row.id, None)
            self._accepted += 1
            self._pending.append(row)
        if dup:
            log.warning("refused %d duplicate record(s), e.g. %s", len(dup), dup[0])
        return dup

    def holds(self, rid: str) -> bool:
        """Whether the part holds ``rid``'s record for this life (pending rows included): any
        record, unless its current one is a failed record from before the life started
        (``WriterOwner.start_rows``) that no row has replaced yet: a retry still to come."""
        return rid in self.ids and rid not in self._awaiting

    @property
    def pending(self) -> int:
        return len(self._pending)

    def pending_ids(self) -> list[str]:
        return [r.id for r in self._pending]

    def take_pending(self) -> list[RecordRow]:
        """Hand over the buffered rows (for a commit done on another thread)."""
        rows, self._pending = self._pending, []
        return rows

    def commit(self) -> int:
        """Write pending rows as whole chunks, fsync, then advance ``commit.json``."""
        return self.write(self.take_pending())

    def write(self, new: list[RecordRow]) -> int:
        """Durably commit ``new`` (rows already accepted by :meth:`append`).

        A row the store cannot write (see :meth:`RecordRow.problem`) is replaced *in*
        ``new`` by its ``bad_record`` failure, and the rest commit: one row never holds
        its batch back. An ``OSError`` (the disk) is raised as it is, rows untouched."""
        if not new:
            return 0
        if not self._lock.held:
            raise StoreError(f"{self.dir}: this writer released its lock; it may not write any more")
        rows = self._tail + new
        start = self.rows - len(self._tail)  # chunk-aligned
        end = start + len(rows)
        capacity = min(arr.shape[0] for arr in self._arrays.values())  # each array: a failed resize may have left some short
        if end > capacity:
            grow = self.chunk_rows * _GROW_CHUNKS
            new_cap = ((end + grow - 1) // grow) * grow
            for arr in self._arrays.values():
                if arr.shape[0] < end:
                    arr.resize((new_cap,))
        touched = range(start // self.chunk_rows, (end - 1) // self.chunk_rows + 1)
        try:
            self._put(start, end, rows)
        except OSError:
            raise
        except Exception as exc:  # not the disk: a row the store cannot hold (the tail's were written before)
            if not self._replace_bad(new):
                raise
            log.warning("%s: wrote the rest of the batch after %s", self.dir, f"{type(exc).__name__}: {exc}")
            rows = self._tail + new
            self._put(start, end, rows)
        if self.fsync:
            self._fsync_chunks(touched, resized=end > capacity)
        # commit.json first: if it cannot be written, rows and tail stay as they were and the
        # sink's retry rewrites the same chunk-aligned range instead of appending it again.
        atomic_write_json(self.paths.commit, {"rows": end, "updated_at": time.time()}, self.fsync)
        self.rows = end
        self._tail = rows[len(rows) - (end % self.chunk_rows) :] if end % self.chunk_rows else []
        return len(new)

    def _put(self, start: int, end: int, rows: list[RecordRow]) -> None:
        # Whole chunks only: the last chunk is padded with the array's fill value (what it holds
        # past the last row anyway; readers stop at commit.json's rows). A write that covers part
        # of a chunk makes zarr read and decode the chunk's previous version to merge into it,
        # and the tail chunk is rewritten at every commit: that was a quarter of a commit's CPU.
        chunk_end = -(-end // self.chunk_rows) * self.chunk_rows
        columns = []
        for name, arr in self._arrays.items():
            stop = min(chunk_end, arr.shape[0])
            values = [getattr(r, name) for r in rows]
            values.extend([arr.fill_value] * (stop - end))
            dtype = object if name in STR_COLUMNS else NUM_COLUMNS[name]
            columns.append((arr.async_array, slice(start, stop), np.array(values, dtype=dtype)))
        # Every column in one trip to zarr's I/O loop, not one blocking round trip each.
        zarr_sync(_set_all(columns))

    def _replace_bad(self, new: list[RecordRow]) -> int:
        """Replace each row of ``new`` the store cannot write by its ``bad_record``; how many."""
        bad = 0
        for i, row in enumerate(new):
            problem = row.problem()
            if problem is not None:
                new[i] = RecordRow.bad_record(row, problem)
                log.error("record %r cannot be written (%s): stored as a failed record (bad_record)", new[i].id, problem)
                bad += 1
        return bad

    def _fsync_chunks(self, chunks: range, resized: bool) -> None:
        for name in self._arrays:
            cdir = self.paths.data / name / "c"
            for k in chunks:
                chunk = cdir / str(k)
                if chunk.exists():
                    fsync_path(chunk)
            if cdir.exists():
                fsync_path(cdir)
            if resized:
                fsync_path(self.paths.data / name / "zarr.json")

    def close(self, commit: bool = True) -> None:
        """Commit what is pending (unless ``commit`` is False), then give up the part:
        the lease is marked released *before* the lock goes, so nobody who sees the
        lock free can see a live lease of this writer."""
        if not self._lock.held:
            return
        try:
            if commit:
                self.commit()
        finally:
            try:
                self._lease.released = True
                self._lease.write(self.lease_path)
            except OSError as exc:  # a full disk: the lease expires on its own
                log.warning("cannot mark the lease %s released: %s", self.lease_path, exc)
            self._lock.release()


class _PartSlices:
    """A part's committed columns for :func:`~.latest.resume_state`, read a slice at a time."""

    def __init__(self, group: zarr.Group, rows: int) -> None:
        self.group, self.rows = group, rows

    @property
    def replaces(self) -> np.ndarray:  # read when the part's turn comes (8 bytes a row)
        g, rows = self.group, self.rows
        return g[REPLACES][:rows] if rows and REPLACES in g else np.full(rows, -1, np.int64)

    def read(self, lo: int, hi: int) -> tuple[list[str], list[str], list[str]]:
        g = self.group
        return list(map(str, g["id"][lo:hi].tolist())), g["status"][lo:hi].tolist(), g["error_kind"][lo:hi].tolist()


class StoreReader:
    """Read-only view of committed records across all parts.

    Every read but :meth:`history` and :meth:`resume_state` sees current records only, one
    per id: a record a retry replaced is left out (the rule: :mod:`.latest`)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not RunLayout(self.root).store_json.exists():
            raise StoreError(f"{self.root}: not a matrix-hpc output folder (no store.json)")
        self.parts = [p.dir for p in RunLayout(self.root).parts() if p.has_data]
        self._masks: dict[tuple[str, int], np.ndarray | None] = {}

    def _part(self, part: Path) -> tuple[zarr.Group, int]:
        paths = PartLayout(part)
        rows = int(read_json(paths.commit, {"rows": 0})["rows"])
        group = zarr.open_group(str(paths.data), mode="r")
        return group, rows

    def current(self, part: Path, group: zarr.Group, rows: int) -> np.ndarray | None:
        """Which of the part's first ``rows`` rows are current (None: all of them)."""
        key = (part.name, rows)
        if key not in self._masks:
            self._masks[key] = current_mask(group[REPLACES][:rows]) if rows and REPLACES in group else None
        return self._masks[key]

    def committed(self) -> dict[str, int]:
        """Committed rows per part (``{"part-000": N}``): a mark to read only newer rows from."""
        return {p.name: self._part(p)[1] for p in self.parts}

    def column(self, name: str, since: dict[str, int] | None = None) -> list[Any]:
        """Column ``name`` of current committed rows (only rows past ``since``'s marks, if given)."""
        out: list[Any] = []
        for part in self.parts:
            group, rows = self._part(part)
            lo = (since or {}).get(part.name, 0)
            if rows > lo:
                values = group[name][lo:rows]
                mask = self.current(part, group, rows)
                out.extend((values if mask is None else values[mask[lo:rows]]).tolist())
        return out

    def ids(self) -> set[str]:
        return set(self.column("id"))

    def __len__(self) -> int:
        """Current records (one per id)."""
        total = 0
        for part in self.parts:
            group, rows = self._part(part)
            mask = self.current(part, group, rows)
            total += rows if mask is None else int(mask.sum())
        return total

    def replaced(self) -> int:
        """Committed records a retry replaced: the history every other read leaves out."""
        return sum(self._part(p)[1] for p in self.parts) - len(self)

    def replaced_since(self, since: dict[str, int], upto: dict[str, int] | None = None) -> bool:
        """Whether a row past ``since`` (up to ``upto``) replaces an earlier record: totals kept
        for the rows before ``since`` then count a record that is no longer current."""
        for part in self.parts:
            group, rows = self._part(part)
            hi = min(rows, (upto or {}).get(part.name, rows))
            lo = since.get(part.name, 0)
            if hi > lo and REPLACES in group and bool((group[REPLACES][lo:hi] >= 0).any()):
                return True
        return False

    def iter_records(
        self, chunk: int = 4096, since: dict[str, int] | None = None, upto: dict[str, int] | None = None, history: bool = False
    ) -> Iterator[dict[str, Any]]:
        """Current committed records, optionally only those between the marks ``since`` and
        ``upto`` (current as of ``upto``); ``history``: replaced records too, in store order."""
        for part in self.parts:
            group, rows = self._part(part)
            if upto is not None:
                rows = min(rows, upto.get(part.name, 0))
            mask = None if history else self.current(part, group, rows)
            arr = group["record"]
            for lo in range((since or {}).get(part.name, 0), rows, chunk):
                hi = min(rows, lo + chunk)
                texts = arr[lo:hi].tolist()
                keep = mask[lo:hi].tolist() if mask is not None else None
                for i, text in enumerate(texts):
                    if keep is None or keep[i]:
                        yield json.loads(text)

    def history(self, rid: str) -> list[tuple[str, int, dict[str, Any]]]:
        """Every record of ``rid``, replaced ones first, as (part, row, record): store order."""
        out = []
        for part in self.parts:
            group, rows = self._part(part)
            if not rows:
                continue
            hits = np.flatnonzero(group["id"][:rows] == rid)
            for row in hits.tolist():
                out.append((part.name, row, json.loads(group["record"][row : row + 1].tolist()[0])))
        return out

    def resume_state(self, kinds: frozenset[str] | None = None, exact_hashes: Iterable[int] = ()) -> ResumeState:
        """The ids a run skips, and those it runs again with ``run.retry_failed`` (``kinds``);
        ``exact_hashes``: see :func:`~.latest.resume_state`."""
        return resume_state((_PartSlices(*self._part(part)) for part in self.parts), kinds, exact_hashes)

    def counts(self, since: dict[str, int] | None = None) -> dict[str, Any]:
        """done / failed totals, failures by kind, tokens (of rows past ``since``, if given)."""
        statuses = self.column("status", since)
        status = Counter(statuses)
        kinds = Counter(k for k, s in zip(self.column("error_kind", since), statuses) if s == "failed")
        return {
            "records": sum(status.values()),
            "ok": status.get("ok", 0),
            "failed": status.get("failed", 0),
            "failed_by_kind": dict(kinds.most_common()),
            "prompt_tokens": int(sum(self.column("prompt_tokens", since))),
            "completion_tokens": int(sum(self.column("completion_tokens", since))),
        }

    def writer_active(self) -> bool:
        return any(WriterLock.is_held(PartLayout(p).lock) for p in self.parts)

    def run_info(self) -> dict[str, Any]:
        return read_json(RunLayout(self.root).run_json, {}) or {}


async def _set_all(columns: list[tuple[Any, slice, np.ndarray]]) -> None:
    """Write every column; the first error is raised once all writes have ended (none is left running)."""
    results = await asyncio.gather(*(arr.setitem(where, values) for arr, where, values in columns), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
