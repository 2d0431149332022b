"""The sink: the one writer of a run's store part.

Agents send finished tasks here as :class:`~matrix_hpc.store.RecordRow` batches;
the sink buffers them and commits every ``flush_interval_s`` or full chunk. The
driver learns what is durable by long-polling :meth:`SinkActor.poll`, which is
one call per poll interval, not per task.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections import Counter
from typing import Any

import ray

from .. import metrics
from ..store import RecordRow, StoreWriter
from .health import ActorPing

__all__ = ["SinkActor", "SinkStats"]

log = logging.getLogger(__name__)

SinkStats = dict[str, Any]


@ray.remote(num_cpus=0, max_restarts=10, max_task_retries=-1)
class SinkActor:
    def __init__(self, root: str, chunk_rows: int, flush_interval_s: float, fsync: bool, export_metrics: bool = True) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        metrics.configure(export_metrics)
        self.writer = StoreWriter(root, part=0, chunk_rows=chunk_rows, fsync=fsync)
        self.incarnation = uuid.uuid4().hex
        self.flush_interval_s = flush_interval_s
        self._log: list[str] = []  # ids committed by this incarnation, in order
        self._received: list[str] = []  # ids accepted (not yet necessarily committed)
        self._committing: list[RecordRow] = []
        self._status: Counter[str] = Counter()
        self._failed_kinds: Counter[str] = Counter()
        self._tokens = [0, 0]
        self._duplicates = 0
        self._lock: asyncio.Lock | None = None
        self._committed: asyncio.Condition | None = None
        self._flusher: asyncio.Task[None] | None = None

    def _ensure_loop(self) -> None:
        if self._flusher is None:
            self._lock = asyncio.Lock()
            self._committed = asyncio.Condition()
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def receive(self, rows: list[RecordRow]) -> None:
        self._ensure_loop()
        refused = self.writer.append(rows)
        refused_set = set(refused)
        self._received.extend(r.id for r in rows if r.id not in refused_set)
        if refused:
            # A copy of a task that is already durable (a re-sent task, or one a
            # crashed run committed late): report it as committed so no driver waits
            # on it. Copies of rows still pending are reported when those commit.
            self._duplicates += len(refused)
            held = set(self.held_ids())
            self._log.extend(i for i in refused if i not in held)
        if self.writer.pending >= self.writer.chunk_rows:
            asyncio.get_running_loop().create_task(self._commit())
        assert self._committed is not None
        async with self._committed:
            self._committed.notify_all()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            await self._commit()

    async def _commit(self) -> None:
        assert self._lock is not None and self._committed is not None
        async with self._lock:
            rows = self.writer.take_pending()
            if not rows:
                return
            self._committing = rows
            started = time.monotonic()
            await asyncio.to_thread(self.writer.write, rows)
            self._committing = []
            finished: Counter[tuple[str, str]] = Counter()
            for r in rows:
                self._status[r.status] += 1
                if r.status == "failed":
                    self._failed_kinds[r.error_kind] += 1
                finished[(r.status, r.error_kind or "")] += 1
                self._tokens[0] += r.prompt_tokens
                self._tokens[1] += r.completion_tokens
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

    async def poll(self, received_from: int, committed_from: int, wait_s: float = 0.25) -> tuple[str, list[str], list[str], SinkStats]:
        """Ids received and ids committed since the given offsets (waiting up to
        ``wait_s`` for news), and stats. Received frees the driver's in-flight slot;
        committed ends its responsibility for the task."""
        self._ensure_loop()
        assert self._committed is not None
        if len(self._received) <= received_from and len(self._log) <= committed_from:
            async with self._committed:
                try:
                    await asyncio.wait_for(self._committed.wait(), wait_s)
                except asyncio.TimeoutError:
                    pass
        return self.incarnation, self._received[received_from:], self._log[committed_from:], self.stats()

    async def flush(self) -> None:
        """Commit now rather than at the next interval (the run's last tasks are in)."""
        self._ensure_loop()
        await self._commit()

    def stats(self) -> SinkStats:
        return {
            "ok": self._status.get("ok", 0),
            "failed": self._status.get("failed", 0),
            "failed_by_kind": dict(self._failed_kinds),
            "prompt_tokens": self._tokens[0],
            "completion_tokens": self._tokens[1],
            "duplicates_refused": self._duplicates,
            "rows": self.writer.rows,
        }

    def committed(self, ids: list[str]) -> list[str]:
        """Which of ``ids`` are durably in the store (after a sink restart)."""
        pending = set(self.held_ids())
        return [i for i in ids if i in self.writer.ids and i not in pending]

    def ping(self) -> ActorPing:
        return ActorPing(self.incarnation, os.getpid(), socket.gethostname())

    def held_ids(self) -> list[str]:
        return [r.id for r in self._committing] + self.writer.pending_ids()

    async def close(self) -> SinkStats:
        """Commit everything and release the store."""
        self._ensure_loop()
        await self._commit()
        assert self._flusher is not None
        self._flusher.cancel()
        self.writer.close()
        metrics.flush()  # the metrics thread would miss the last second
        return self.stats()
