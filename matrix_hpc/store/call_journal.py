"""The call journal's lifecycle, in one place: naming, a life's merge, compaction, flushing, removal.

The journal (``RunLayout.journal``, ``run.replay``) keeps every completed LLM call of a task
that is not yet committed, so a later life answers those calls again without paying for
them (see runtime/replay.py for what a call's key is, store/journal.py for the file format).
:class:`CallJournal` is its one owner; each step below has one caller::

    step                       who                         what is on disk after it
    1 start_life(done)         the driver, before Ray      base-<run>.jnl: the previous lives' calls of tasks
                                                           not in ``done``; no other segment, no temp file
    2 open_segment(...)        an actor incarnation        + <run>-<role>-<i>-<inc8>.jnl, empty, its name fsynced
    3 JournalSegment.append    an agent's chat, after      + one whole frame per call, written and fsynced in a
                               the LLM answered            batch within ~10 ms (the task does not wait)
    4 JournalSegment.compact   the segment itself, every   its own file rewritten without the calls of tasks
                               ``run.replay_compact_s``    the sink has committed (temp file, fsync, rename)
    5 JournalSegment.flush /   the driver before a         every queued call on disk; close() also releases
      close                    graceful stop; the actor    the files it reads
    6 remove()                 the driver, once every      the folder is gone
                               task is committed

**Invariant.** Every file has one writer: an incarnation only appends to the segment it
created (a restarted actor gets a new one and reads the old, never appends to a file a
dead writer may have torn), and the base file is written only at a life's start, when
no writer is alive. A call is in the journal from the end of the flush that carried it
until its task is committed (steps 4 and 1 drop it then, step 6 with everything), so:

* **No paid-for call is lost** once its flush ended: a later life's segments index every
  file present when they open (the base and the earlier incarnations' segments); merges and
  compactions keep every entry of an uncommitted task. Lost are only calls in the flush
  window (~10 ms) at a kill; a graceful stop flushes first (step 5).
* **None is replayed twice or wrongly.** An entry's key is its task, the call's number in
  that task's attempt and the whole request: it answers that one call of that task, and a
  changed request misses. Entries of committed tasks are dropped, and a committed task is
  never run again (the source skips it; the store refuses a copy).

**A crash at each step leaves:**

1. before the merged file's rename: the old files as they were, plus a ``.base-<run>.jnl.tmp``
   (not a ``*.jnl``: nobody reads it); after the rename, before the sources are removed: the
   merged file *and* its sources, whose duplicate entries answer the same calls. The next
   ``start_life`` merges again and removes stale temp files.
2. an empty segment, or none: read as empty.
3. a torn tail (short frame, bad crc, zeros): readers stop at the first bad frame, so every
   entry read is whole; the calls of that window are paid again.
4. before the rename: the segment intact plus ``.<segment>.tmp``; after it: the compacted
   segment. Readers that opened the old file keep reading it (they hold its descriptor).
5. as 3.
6. part of the folder: the next life (a re-run of a finished job) keeps nothing of it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Awaitable, Callable, Container, Iterable
from dataclasses import dataclass
from pathlib import Path

from .journal import SUFFIX, JournalEntry, JournalIndex, JournalWriter, compact_journal, journal_size

__all__ = ["CallJournal", "JournalSegment", "LifeStart"]

log = logging.getLogger(__name__)

Committed = Callable[[list[str]], Awaitable[Iterable[str]]]
"""Which of these task ids are committed (for the journal: the sink's answer, one Ray call)."""


@dataclass(frozen=True)
class LifeStart:
    """What a life's start found in the journal and kept of it."""

    files: int
    """Journal files found (the earlier lives' base and segments)."""
    bytes_before: int
    kept: int
    """Entries kept: the calls of tasks not in the store."""
    bytes_kept: int


class JournalSegment:
    """One actor incarnation's part of the journal: the file it writes (it is that file's one
    writer) and an index over the files that existed when it opened (step 2 of the module)."""

    def __init__(self, path: Path, fsync: bool = True, flush_interval_s: float = 0.01) -> None:
        self.path = path
        # The own file first: the index then sees every other file present now.
        self.writer = JournalWriter(path, flush_interval_s=flush_interval_s, fsync=fsync)
        self.index = JournalIndex(path.parent, exclude={path.name})
        log.info("replay: %d journaled call(s) found in %s", len(self.index), path.parent)

    def get(self, digest: str) -> JournalEntry | None:
        """The entry of call ``digest``: from an earlier file, or one this segment wrote."""
        return self.index.get(digest) or self.writer.get(digest)

    def append(self, entry: JournalEntry) -> None:
        """Queue ``entry``: durable within one flush window (step 3); the caller does not wait."""
        self.writer.append_nowait(entry)

    async def flush(self) -> None:
        """Wait until every entry queued so far is on disk (step 5)."""
        await self.writer.flush()

    async def compact(self, committed: Committed) -> int:
        """Drop this segment's entries of tasks ``committed`` names (step 4); returns how many."""
        ids = self.writer.task_ids()
        if not ids:
            return 0
        return await self.writer.compact(set(await committed(ids)))

    async def compact_every(self, interval_s: float, committed: Committed) -> None:
        """Compact every ``interval_s`` until cancelled. A failed round (a restarting sink) is
        logged and tried again at the next: the loop never ends on an error."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                dropped = await self.compact(committed)
            except Exception as exc:
                log.info("journal compaction of %s postponed: %s", self.path.name, exc)
                continue
            if dropped:
                log.debug("journal: dropped %d entries of committed tasks", dropped)

    async def close(self) -> None:
        """Flush what is queued, close the file and the files the index reads (step 5)."""
        try:
            await self.writer.close()
        finally:
            self.index.close()


class CallJournal:
    """The call journal of run ``run_id`` in ``directory`` (``RunLayout.journal``): the module
    docstring states its lifecycle, its invariant and what a crash at each step leaves."""

    def __init__(self, directory: str | os.PathLike[str], run_id: str, fsync: bool = True, flush_interval_s: float = 0.01) -> None:
        self.dir = Path(directory)
        self.run_id = run_id
        self.fsync = fsync
        self.flush_interval_s = flush_interval_s

    @property
    def base(self) -> Path:
        """``base-<run>.jnl``: what this life's start kept of the earlier lives."""
        return self.dir / f"base-{self.run_id}{SUFFIX}"

    def segment_path(self, role: str, index: int, incarnation: str) -> Path:
        """``<run>-<role>-<index>-<incarnation[:8]>.jnl``: one actor incarnation's file."""
        return self.dir / f"{self.run_id}-{role}-{index}-{incarnation[:8]}{SUFFIX}"

    def start_life(self, done: Container[str]) -> LifeStart:
        """Step 1, while no writer is alive: merge every file into :attr:`base`, keeping the
        entries of tasks not in ``done``, and remove what a crashed merge or compaction left."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.dir.glob(f".*{SUFFIX}.tmp"):
            tmp.unlink(missing_ok=True)
        files, before = journal_size(self.dir)
        kept, size = compact_journal(self.dir, lambda task_id: task_id not in done, self.base.name)
        return LifeStart(files, before, kept, size)

    def open_segment(self, role: str, index: int, incarnation: str) -> JournalSegment:
        """Step 2: the segment of one actor incarnation (a new file; a restart gets another)."""
        return JournalSegment(self.segment_path(role, index, incarnation), self.fsync, self.flush_interval_s)

    def size(self) -> tuple[int, int]:
        """(files, bytes) on disk now."""
        return journal_size(self.dir)

    def remove(self) -> None:
        """Step 6: the run is finished (every task committed), nothing is left to replay."""
        shutil.rmtree(self.dir, ignore_errors=True)
