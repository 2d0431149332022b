"""The sink: the one writer of a run's store part.

Agents send finished tasks here as :class:`~matrix_hpc.store.RecordRow` batches;
the sink buffers them and commits every ``flush_interval_s`` or full chunk. The
driver learns what is durable by long-polling :meth:`SinkActor.poll`, which is
one call per poll interval, not per task.

A commit that fails with an ``OSError`` (disk full, EIO, quota) keeps its rows,
which still count as held by the sink, and is retried with backoff; past
``commit_retry_s`` of failing the sink reports ``gave_up`` and the driver stops the
run. A row the store cannot write fails alone (``bad_record``) and the rest of its
batch commits; any other error is a bug, not a disk, and stops the run at once.
An id is reported committed only after its rows are durable.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace

import ray

from .. import metrics
from ..store.fsutil import LEASE_S
from ..store.record_row import RecordRow, WriterOwner
from ..store.tokens import TokenUsage
from .health import ActorPing

__all__ = ["SinkActor", "SinkStats"]

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 5.0
_TRIM_AT = 4096  # drop ids the driver has read once this many piled up (bounded memory)


@dataclass
class SinkStats:
    """What the sink has committed in this life, and whether commits are failing."""

    ok: int = 0
    failed: int = 0
    failed_by_kind: dict[str, int] = field(default_factory=dict)
    tokens: TokenUsage = field(default_factory=TokenUsage)
    """Tokens of the committed records (the store's columns: token counts only)."""
    duplicates_refused: int = 0
    rows: int = 0
    """Committed rows of the part (all runs), as of the counts above."""
    start_rows: int = 0
    """``rows`` when this incarnation opened the part: from an earlier incarnation's last
    reported ``rows`` to here are rows it committed unreported (see ``SinkFollower``)."""
    commit_error: str | None = None
    """The last commit's error while commits fail (None once one succeeds)."""
    commit_failing_s: float = 0.0
    gave_up: str | None = None
    """Set when commits failed for longer than ``commit_retry_s``: the run must stop."""
    first_failure: str | None = None
    """``task ID: message`` of the first failed record this incarnation committed, bad input
    rows aside (the driver's early stop quotes it)."""

    def plus(self, other: SinkStats) -> SinkStats:
        """The counts of both (e.g. an earlier incarnation's and this one's); the rest from ``other``."""
        kinds = Counter(self.failed_by_kind)
        kinds.update(other.failed_by_kind)
        return replace(
            other, ok=self.ok + other.ok, failed=self.failed + other.failed, failed_by_kind=dict(kinds),
            tokens=self.tokens + other.tokens,
            duplicates_refused=self.duplicates_refused + other.duplicates_refused,
            first_failure=self.first_failure or other.first_failure,
        )  # fmt: skip


def _failure_line(row: RecordRow) -> str:
    """``task ID: message`` of a failed row (read once per incarnation: the record is JSON text)."""
    try:
        message = (json.loads(row.record).get("error") or {}).get("message") or ""
    except (ValueError, AttributeError):
        message = ""
    return f"task {row.id}: {message or row.error_kind}"


class _IdLog:
    """An append-only list of ids read by one consumer through offsets; the prefix
    the consumer has read is dropped, so it does not grow with the run."""

    def __init__(self) -> None:
        self._ids: list[str] = []
        self._base = 0  # offset of self._ids[0]

    def extend(self, ids: list[str] | object) -> None:
        self._ids.extend(ids)  # type: ignore[arg-type]

    @property
    def end(self) -> int:
        return self._base + len(self._ids)

    def since(self, offset: int) -> list[str]:
        lo = max(0, offset - self._base)
        if lo >= _TRIM_AT:  # the consumer has everything before ``offset``
            del self._ids[:lo]
            self._base += lo
            lo = 0
        return self._ids[lo:]


@ray.remote(num_cpus=0, max_restarts=10, max_task_retries=-1)
class SinkActor:
    def __init__(
        self, root: str, chunk_rows: int, flush_interval_s: float, fsync: bool, export_metrics: bool = True,
        commit_retry_s: float = 300.0, owner: WriterOwner | None = None,
    ) -> None:  # fmt: skip
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        metrics.configure(export_metrics, owner.run_id if owner is not None else "")
        # Imported here, not with the module: every agent actor that looks the sink up by name
        # (ray.get_actor) unpickles this class, and so imports this module, but never writes.
        from ..store.zarr_store import StoreWriter

        self.writer = StoreWriter(root, part=0, chunk_rows=chunk_rows, fsync=fsync, owner=owner)
        self.incarnation = uuid.uuid4().hex
        self.flush_interval_s = flush_interval_s
        self.commit_retry_s = commit_retry_s
        self._log = _IdLog()  # ids committed by this incarnation, in order
        self._received = _IdLog()  # ids accepted (not yet necessarily committed)
        self._committing: list[RecordRow] = []  # taken from the writer; kept until durable
        self._stats = SinkStats(rows=self.writer.rows, start_rows=self.writer.rows)
        self._status: Counter[str] = Counter()
        self._failed_kinds: Counter[str] = Counter()
        self._failing_since: float | None = None
        self._backoff_s = 0.0
        self._closed = False
        self._lock: asyncio.Lock | None = None
        self._committed: asyncio.Condition | None = None
        self._flusher: asyncio.Task[None] | None = None
        # The lease is renewed on its own thread: a commit slower than the lease (a slow or
        # hung file system), or a busy event loop, must not let it expire under a live writer.
        self._lease_stop = threading.Event()
        self._lease_lock = threading.Lock()  # a renewal and the writer's close write one lease file
        threading.Thread(target=self._renew_lease, name="sink-lease", daemon=True).start()

    def _ensure_loop(self) -> None:
        if self._flusher is None:
            self._lock = asyncio.Lock()
            self._committed = asyncio.Condition()
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def receive(self, rows: list[RecordRow]) -> None:
        if self._closed:  # the sender keeps the rows: they are not ours to lose
            from ..store.zarr_store import StoreError

            raise StoreError(f"{self.writer.dir}: the sink is closed; rows are refused")
        self._ensure_loop()
        refused = self.writer.append(rows)
        refused_set = set(refused)
        self._received.extend(r.id for r in rows if r.id not in refused_set)
        if refused:
            # A copy of a task that is already durable (a re-sent task, or one a
            # crashed run committed late): report it as committed so no driver waits
            # on it. Copies of rows still pending are reported when those commit.
            self._stats.duplicates_refused += len(refused)
            held = set(self.held_ids())
            self._log.extend(i for i in refused if i not in held)
        if self.writer.pending >= self.writer.chunk_rows and self._failing_since is None:
            asyncio.get_running_loop().create_task(self._commit())
        assert self._committed is not None
        async with self._committed:
            self._committed.notify_all()

    async def _flush_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self._backoff_s or self.flush_interval_s)
            try:
                await self._commit()
            except Exception:  # this loop is the run's only committer: it must not die
                log.exception("sink flush loop error (retrying)")
                self._backoff_s = _MAX_BACKOFF_S

    def _renew_lease(self, period_s: float = LEASE_S / 3) -> None:
        """Tell other hosts this writer lives, every ``period_s``, until :meth:`close`."""
        failing = False
        while not self._lease_stop.wait(period_s):
            try:
                with self._lease_lock:
                    if self._lease_stop.is_set():
                        return
                    self.writer.renew_lease()
                if failing:
                    log.warning("the lease %s is renewed again", self.writer.lease_path)
                failing = False
            except Exception as exc:  # a full disk: the lock still holds on this host; try again next period
                if not failing:
                    log.warning("cannot renew the lease %s (%s: %s); retrying every %.0fs", self.writer.lease_path, type(exc).__name__, exc, period_s)
                failing = True

    async def _commit(self) -> None:
        assert self._lock is not None and self._committed is not None
        async with self._lock:
            # Rows of a failed commit stay at the front, newer ones join them.
            self._committing = self._committing + self.writer.take_pending()
            rows = self._committing
            if not rows:
                return
            started = time.monotonic()
            try:
                # A row the store cannot write comes back replaced (in ``rows``) by its
                # bad_record failure: it fails alone and the rest of the batch commits.
                await asyncio.to_thread(self.writer.write, rows)
            except OSError as exc:  # disk full, EIO, quota, a broken mount: keep the rows, retry
                self._commit_failed(exc, len(rows))
                return
            except Exception as exc:  # not the disk, and no row to blame: a bug retries cannot fix
                self._commit_broken(exc, len(rows))
                return
            self._committing = []
            if self._failing_since is not None:
                log.warning("commits succeed again after %.1fs; %d rows committed", time.monotonic() - self._failing_since, len(rows))
            self._failing_since, self._backoff_s = None, 0.0
            self._stats.commit_error, self._stats.commit_failing_s = None, 0.0
            finished: Counter[tuple[str, str]] = Counter()
            for r in rows:
                self._status[r.status] += 1
                if r.status == "failed":
                    self._failed_kinds[r.error_kind] += 1
                    if self._stats.first_failure is None and r.error_kind != "bad_input":
                        self._stats.first_failure = _failure_line(r)
                finished[(r.status, r.error_kind or "")] += 1
                self._stats.tokens += TokenUsage(prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens)
            self._stats.rows = self.writer.rows  # with the counts, so a poll sees both or neither
            self._log.extend(r.id for r in rows)
            took = time.monotonic() - started
            log.debug("committed %d rows in %.3fs", len(rows), took)
            metrics.inc("store_commits")
            metrics.inc("store_rows", len(rows))
            metrics.observe("store_commit_seconds", took)
            for (status, kind), n in finished.items():
                metrics.inc("tasks_finished", n, status, kind)
        async with self._committed:
            self._committed.notify_all()

    def _commit_failed(self, exc: Exception, n: int) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        failing = now - self._failing_since
        self._backoff_s = min(_MAX_BACKOFF_S, max(self.flush_interval_s, 2 * self._backoff_s))
        msg = f"{type(exc).__name__}: {exc}"
        self._stats.commit_error, self._stats.commit_failing_s = msg, failing
        log.warning("commit of %d rows to %s failed for %.1fs (%s); retrying in %.1fs", n, self.writer.dir, failing, msg, self._backoff_s)
        if failing > self.commit_retry_s and self._stats.gave_up is None:
            self._stats.gave_up = f"commits to {self.writer.dir} failed for {failing:.0f}s (output.commit_retry_s={self.commit_retry_s:g}): {msg}"
            log.error("%s", self._stats.gave_up)

    def _commit_broken(self, exc: Exception, n: int) -> None:
        """Stop the run at once with one line (rows kept, still held): this is not a full
        disk, so waiting ``commit_retry_s`` for it to pass would only hide it."""
        if self._failing_since is None:
            self._failing_since = time.monotonic()
        self._backoff_s = _MAX_BACKOFF_S
        msg = f"{type(exc).__name__}: {exc}"
        self._stats.commit_error = msg
        if self._stats.gave_up is None:
            self._stats.gave_up = f"commit of {n} rows to {self.writer.dir} failed with an error that is not the disk's (a bug: please report it): {msg}"
            log.error("%s", self._stats.gave_up, exc_info=exc)

    async def poll(
        self, known_incarnation: str | None, received_from: int, committed_from: int, wait_s: float = 0.25, min_received: int = 1
    ) -> tuple[str, list[str], list[str], SinkStats]:
        """Ids received and ids committed since the given offsets, and stats. It answers
        once ``min_received`` ids were received since ``received_from``, or any was
        committed, or ``wait_s`` passed, whichever is first. Received frees the driver's
        in-flight slot; committed ends its responsibility for the task. Ids before the
        offsets are forgotten: the driver has them. Offsets count in ``known_incarnation``;
        a driver that last saw an earlier sink (this one restarted) reads from 0."""
        self._ensure_loop()
        assert self._committed is not None
        if known_incarnation != self.incarnation:  # stale offsets would trim ids never reported
            received_from = committed_from = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while self._received.end - received_from < min_received and self._log.end <= committed_from:
            left = deadline - loop.time()
            if left <= 0:
                break
            async with self._committed:
                try:
                    await asyncio.wait_for(self._committed.wait(), left)
                except TimeoutError:
                    break
        return self.incarnation, self._received.since(received_from), self._log.since(committed_from), self.stats()

    async def flush(self) -> None:
        """Commit now rather than at the next interval (the run's last tasks are in)."""
        self._ensure_loop()
        if self._failing_since is None:
            await self._commit()

    def stats(self) -> SinkStats:
        s = self._stats
        s.ok, s.failed = self._status.get("ok", 0), self._status.get("failed", 0)
        s.failed_by_kind = dict(self._failed_kinds)
        if self._failing_since is not None:
            s.commit_failing_s = time.monotonic() - self._failing_since
        return s

    def tally(self, lo: int, hi: int) -> SinkStats:
        """The counts of the part's committed rows ``lo:hi``: those an earlier incarnation
        committed after the driver last heard from it (a poll's stats never had them)."""
        cols = self.writer.columns(lo, min(hi, self.writer.rows), ("status", "error_kind", "prompt_tokens", "completion_tokens"))
        status, kinds = Counter(cols["status"]), Counter(k for s, k in zip(cols["status"], cols["error_kind"]) if s == "failed")
        tokens = TokenUsage(prompt_tokens=sum(cols["prompt_tokens"]), completion_tokens=sum(cols["completion_tokens"]))
        return SinkStats(ok=status.get("ok", 0), failed=status.get("failed", 0), failed_by_kind=dict(kinds), tokens=tokens)

    def committed(self, ids: list[str]) -> list[str]:
        """Which of ``ids`` are durably in the store for this life (after a sink restart): a
        retried id once its new record is (its failed one does not count, see ``StoreWriter.holds``)."""
        pending = set(self.held_ids())
        return [i for i in ids if self.writer.holds(i) and i not in pending]

    def ping(self) -> ActorPing:
        return ActorPing(self.incarnation, os.getpid(), socket.gethostname(), progress=self.writer.rows)

    def held_ids(self) -> list[str]:
        return [r.id for r in self._committing] + self.writer.pending_ids()

    async def close(self, commit: bool = True) -> SinkStats:
        """Commit everything (unless ``commit`` is False, e.g. the disk is full) and
        release the store. Rows that arrive later are refused; nothing is written
        after the lock is released."""
        self._ensure_loop()
        if commit:
            await self._commit()
        assert self._lock is not None
        async with self._lock:  # no commit is under way while the writer closes
            self._closed = True
            assert self._flusher is not None
            self._flusher.cancel()
            self._lease_stop.set()
            try:
                with self._lease_lock:  # after any renewal under way: the released lease is the last word
                    self.writer.close(commit=False)
            except OSError as exc:
                log.warning("closing %s: %s", self.writer.dir, exc)
        metrics.flush()  # the metrics thread would miss the last second
        return self.stats()
