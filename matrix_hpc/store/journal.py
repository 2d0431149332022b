"""The call journal: durable, append-only files of completed calls, keyed by a digest.

Layout (under the output folder, so on the shared FS a requeued job sees)::

    OUTPUT/journal/base-<run_id>.jnl          what a life start kept (unfinished tasks' calls)
    OUTPUT/journal/<run_id>-<writer>.jnl      one file per writer (an actor incarnation)

The files' names and their lifecycle (a life's merge, compaction, flushing, removal) belong
to store/call_journal.py; this module is the format and its reader and writer.

A file is a sequence of framed entries ``MJ | length u32 | crc32 u32 | JSON``. Each
file has exactly one writer, which appends whole batches with one ``write`` + ``fsync``
(group commit: :meth:`JournalWriter.append` returns once its entry is durable;
:meth:`~JournalWriter.append_nowait` does not wait). A
kill mid-write leaves a torn tail (short frame, bad crc, zeros): readers stop at the
first bad frame, so every entry they return is whole; a whole frame whose body is not
an entry is skipped and reported (:func:`_entries`), never raised. The store layer
knows nothing of what an entry means: ``payload`` is opaque JSON for the caller (the
runtime).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
import time
import zlib
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fsutil import fsync_path
from .textsafe import json_bytes

__all__ = ["JournalEntry", "JournalIndex", "JournalWriter", "compact_journal", "journal_size", "read_entries"]

log = logging.getLogger(__name__)

MAGIC = b"MJ"
_HEAD = struct.Struct("<2sII")  # magic, payload length, crc32 of the payload
_MAX_ENTRY = 64 << 20  # a length past this is garbage, not an entry
SUFFIX = ".jnl"


@dataclass(slots=True)
class JournalEntry:
    digest: str
    """What the call was (its request digest): the lookup key."""
    task_id: str
    """Whose call it was: entries of committed tasks are dropped by compaction."""
    payload: dict[str, Any]
    """The caller's data (for LLM calls: the response, its usage and latency)."""


def encode(entry: JournalEntry) -> bytes:
    # A reply holding text UTF-8 cannot encode (a lone surrogate) is written escaped and
    # replays exactly as it came (see textsafe): a call that succeeded is never failed here.
    body = json_bytes({"d": entry.digest, "t": entry.task_id, "p": entry.payload})
    return _HEAD.pack(MAGIC, len(body), zlib.crc32(body)) + body


def _decode(body: bytes) -> JournalEntry:
    obj = json.loads(body)
    entry = JournalEntry(obj["d"], obj["t"], obj["p"])
    if not (isinstance(entry.digest, str) and isinstance(entry.task_id, str) and isinstance(entry.payload, dict)):
        raise TypeError("digest, task id or payload of the wrong type")
    return entry


def _frames(data: bytes, path: object = None) -> Iterator[tuple[int, int, bytes]]:
    """(offset, size, body) of each whole frame in ``data``, stopping at the first torn one
    (reported when ``path`` is given: a torn tail after a kill, or a damaged frame)."""
    pos, n = 0, len(data)
    while pos + _HEAD.size <= n:
        magic, length, crc = _HEAD.unpack_from(data, pos)
        end = pos + _HEAD.size + length
        if magic != MAGIC or length == 0 or length > _MAX_ENTRY or end > n:
            break
        body = data[pos + _HEAD.size : end]
        if zlib.crc32(body) != crc:
            break
        yield pos, end - pos, body
        pos = end
    if path is not None and pos < n:
        log.info("%s: torn or damaged frame at byte %d; its last %d bytes are ignored", path, pos, n - pos)


def _entries(data: bytes, path: object) -> Iterator[tuple[int, int, JournalEntry]]:
    """(offset, size, entry) of every whole entry in ``data`` (the contents of ``path``).
    A whole frame (crc valid) whose body is not an entry is skipped and reported: its
    boundaries are sound, so the entries after it are still read."""
    for off, size, body in _frames(data, path):
        try:
            entry = _decode(body)
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            log.warning("%s: frame at byte %d is not a journal entry (%s: %s); skipped", path, off, type(exc).__name__, exc)
            continue
        yield off, size, entry


def read_entries(path: str | os.PathLike[str]) -> Iterator[tuple[int, int, JournalEntry]]:
    """(offset, size, entry) of every whole entry of a journal file; a torn tail is skipped."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return
    yield from _entries(data, path)


def _read_at(fd: int, offset: int, size: int, digest: str) -> JournalEntry | None:
    """The entry at ``offset`` if it is whole and is ``digest``'s (else None: a miss, never a wrong hit)."""
    data = os.pread(fd, size, offset)
    for _, _, body in _frames(data):
        try:
            entry = _decode(body)
        except (ValueError, KeyError, TypeError, RecursionError):
            return None
        return entry if entry.digest == digest else None
    return None


def journal_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"*{SUFFIX}")) if directory.is_dir() else []


def journal_size(directory: str | os.PathLike[str]) -> tuple[int, int]:
    """(files, bytes) of the journal in ``directory``."""
    files = journal_files(Path(directory))
    total = 0
    for f in files:
        try:
            total += f.stat().st_size
        except FileNotFoundError:  # compacted away meanwhile
            pass
    return len(files), total


class JournalIndex:
    """Read-only lookup over the journal files present when it was built.

    It keeps each file open, so a file compacted (replaced or removed) later is
    still read as it was: offsets never point into another file's bytes.
    """

    def __init__(self, directory: str | os.PathLike[str], exclude: Container[str] = ()) -> None:
        self._fds: list[int] = []
        self._where: dict[str, tuple[int, int, int]] = {}  # digest -> (fd, offset, size)
        for path in journal_files(Path(directory)):
            if path.name in exclude:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            self._fds.append(fd)
            for off, size, entry in _entries(_read_fd(fd), path):
                self._where[entry.digest] = (fd, off, size)

    def __len__(self) -> int:
        return len(self._where)

    def get(self, digest: str) -> JournalEntry | None:
        loc = self._where.get(digest)
        return None if loc is None else _read_at(loc[0], loc[1], loc[2], digest)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds, self._where = [], {}


def _read_fd(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""


class JournalWriter:
    """The one writer of one journal file: batched appends, group commit, self-compaction.

    :meth:`append` queues an entry and returns once it is durable; :meth:`append_nowait`
    queues it and returns at once (durable within a flush window). A flush starts as
    soon as the previous one is done and ``flush_interval_s`` has passed since it
    began, so under load one ``write`` + ``fsync`` carries many entries. A write error
    (disk full) disables the writer with one warning: replay is an optimization, a
    call is never failed for it.
    """

    def __init__(self, path: str | os.PathLike[str], flush_interval_s: float = 0.01, fsync: bool = True) -> None:
        self.path = Path(path)
        self.flush_interval_s = flush_interval_s
        self.fsync = fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        self._size = os.fstat(self._fd).st_size
        self._own: dict[str, tuple[int, int]] = {}  # digest -> (offset, size) in this file
        self._by_task: dict[str, list[str]] = {}  # task id -> its digests here
        self._buf: list[tuple[JournalEntry, bytes]] = []
        self._buf_done: asyncio.Future[None] | None = None
        """Done once the entries now in ``_buf`` are on disk: one future per flush, not per entry."""
        self._wake: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None
        self._flusher: asyncio.Task[None] | None = None
        self.disabled: str | None = None
        """Why the writer stopped writing (an I/O error), or None."""
        self.entries = self.flushes = 0
        self.bytes = 0
        self.write_s = 0.0
        """Seconds spent in write + fsync (on the flush thread)."""
        fsync_path(self.path.parent)  # the new file's name is durable before anything refers to it

    def _start(self) -> None:
        self._wake, self._lock = asyncio.Event(), asyncio.Lock()
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def append(self, entry: JournalEntry) -> None:
        """Queue ``entry``; returns when it is on disk (or the writer is disabled)."""
        await self.append_nowait(entry)

    def append_nowait(self, entry: JournalEntry) -> asyncio.Future[None]:
        """Queue ``entry`` for the next flush; the future is done once it is on disk.
        The future is shared by every entry of the same flush.
        """
        if self.disabled:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            fut.set_result(None)
            return fut
        if self._flusher is None:
            self._start()
        assert self._wake is not None
        frame = encode(entry)
        if len(frame) - _HEAD.size > _MAX_ENTRY:  # readers would stop at it and lose every later entry
            log.warning(
                "journal: the call %s of task %s is %d bytes, over the %d a reader accepts; not journaled (it is not replayed)",
                entry.digest[:12],
                entry.task_id,
                len(frame),
                _MAX_ENTRY,
            )
            fut = asyncio.get_running_loop().create_future()
            fut.set_result(None)
            return fut
        if self._buf_done is None:
            self._buf_done = asyncio.get_running_loop().create_future()
        self._buf.append((entry, frame))
        self._wake.set()
        return self._buf_done

    def _take(self) -> tuple[list[tuple[JournalEntry, bytes]], asyncio.Future[None] | None]:
        batch, done = self._buf, self._buf_done
        self._buf, self._buf_done = [], None
        return batch, done

    async def flush(self) -> None:
        """Wait until everything queued so far is on disk."""
        queued = self._buf_done
        if self._lock is not None:
            async with self._lock:  # a flush in progress holds it: its batch is on disk after
                pass
        if queued is not None:
            await queued

    async def _flush_loop(self) -> None:
        assert self._wake is not None and self._lock is not None
        last = 0.0
        while True:
            await self._wake.wait()
            await asyncio.sleep(max(0.0, last + self.flush_interval_s - time.monotonic()))
            self._wake.clear()
            last = time.monotonic()
            async with self._lock:
                batch, done = self._take()
                if batch:
                    await self._flush(batch, done)

    async def _flush(self, batch: list[tuple[JournalEntry, bytes]], done: asyncio.Future[None] | None) -> None:
        data = b"".join(b for _, b in batch)
        if not self.disabled:
            try:
                await asyncio.to_thread(self._write, data)
            except OSError as exc:
                self.disabled = f"{self.path}: {exc.strerror or exc}"
                log.warning("journal disabled, calls are no longer saved for replay: %s", self.disabled)
            else:
                off = self._size
                for entry, b in batch:
                    self._own[entry.digest] = (off, len(b))
                    self._by_task.setdefault(entry.task_id, []).append(entry.digest)
                    off += len(b)
                self._size = off
                self.entries += len(batch)
                self.flushes += 1
                self.bytes += len(data)
        if done is not None and not done.done():
            done.set_result(None)

    def _write(self, data: bytes) -> None:
        t = time.perf_counter()
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        if self.fsync:
            os.fsync(self._fd)
        self.write_s += time.perf_counter() - t

    def get(self, digest: str) -> JournalEntry | None:
        """An entry this writer wrote (still in its file), else None."""
        loc = self._own.get(digest)
        return None if loc is None else _read_at(self._fd, loc[0], loc[1], digest)

    def task_ids(self) -> list[str]:
        """Tasks with entries in this file (what compaction asks the sink about)."""
        return list(self._by_task)

    async def compact(self, drop: Container[str]) -> int:
        """Rewrite this file without the entries of tasks in ``drop``; returns entries dropped."""
        if self.disabled:
            return 0
        if self._lock is None:
            self._start()
        assert self._lock is not None
        async with self._lock:  # no flush runs meanwhile; new appends wait in the buffer
            gone = [t for t in self._by_task if t in drop]
            if not gone:
                return 0
            try:
                fd, size, own, by_task, dropped = await asyncio.to_thread(self._rewrite, set(gone))
            except OSError as exc:
                log.warning("journal compaction of %s failed (kept as is): %s", self.path, exc)
                return 0
            # Swapped and closed here, on the loop: get() runs on it too, so no get() can be
            # reading the old descriptor when it closes (closed on the thread, one got EBADF).
            old, self._fd, self._size, self._own, self._by_task = self._fd, fd, size, own, by_task
            os.close(old)
            return dropped

    def _rewrite(self, gone: set[str]) -> tuple[int, int, dict[str, tuple[int, int]], dict[str, list[str]], int]:
        """Write the kept entries to a new file that replaces this one; returns its open
        descriptor, size, index and the count dropped. Touches no state of ``self``
        but reads its descriptor, which stays open until the caller swaps it."""
        data = _read_fd(self._fd)
        kept: list[bytes] = []
        own: dict[str, tuple[int, int]] = {}
        by_task: dict[str, list[str]] = {}
        off = dropped = 0
        for pos, size, entry in _entries(data, self.path):
            if entry.task_id in gone:
                dropped += 1
                continue
            kept.append(data[pos : pos + size])
            own[entry.digest] = (off, size)
            by_task.setdefault(entry.task_id, []).append(entry.digest)
            off += size
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        try:
            os.write(fd, b"".join(kept))
            if self.fsync:
                os.fsync(fd)
            os.replace(tmp, self.path)  # readers holding the old file keep reading it
            if self.fsync:
                fsync_path(self.path.parent)
        except BaseException:
            os.close(fd)
            raise
        return fd, off, own, by_task, dropped

    async def close(self) -> None:
        """Flush what is queued and close the file."""
        if self._lock is not None:
            async with self._lock:
                batch, done = self._take()
                if batch:
                    await self._flush(batch, done)
            assert self._flusher is not None
            self._flusher.cancel()
        os.close(self._fd)

    @property
    def size(self) -> int:
        return self._size


def compact_journal(directory: str | os.PathLike[str], keep: Callable[[str], bool], into: str) -> tuple[int, int]:
    """Merge every journal file into ``into`` (a file name), keeping only entries whose
    task id ``keep`` accepts; returns (entries kept, bytes). Run it while no writer is
    alive (at a life's start). Crash-safe: the merged file is durable before the old
    ones are removed, and a duplicate entry left by a crash in between is harmless."""
    d = Path(directory)
    sources = journal_files(d)
    if not sources:
        return 0, 0
    seen: set[str] = set()
    kept: list[bytes] = []
    for path in sources:
        data = path.read_bytes()
        for pos, size, entry in _entries(data, path):
            if entry.digest in seen or not keep(entry.task_id):
                continue
            seen.add(entry.digest)
            kept.append(data[pos : pos + size])
    target = d / into
    if kept:
        tmp = d / f".{into}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(b"".join(kept))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        fsync_path(d)
    for path in sources:
        if path != target:
            path.unlink(missing_ok=True)
    fsync_path(d)
    return len(kept), sum(map(len, kept))
