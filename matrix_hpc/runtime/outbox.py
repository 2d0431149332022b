"""Batched, peer-to-peer delivery between actors.

One Ray call costs ~0.5 ms of CPU here, so messages to the same destination role
are gathered and sent as one list per call: a batch leaves when it is full or
when the window has passed. The window adapts (:meth:`Outbox.window`): it keeps
the tasks parked in the outbox to about ``PARKED_SHARE`` of those the actor holds
(Little's law: parked = message rate × window / 2), between ``min_wait_s`` and
``wait_s``. Few tasks in flight: messages leave at once (latency matters then);
many: batches grow and Ray calls per hop fall. Until the receiver has accepted a
batch, its task ids count as held by the sender, so a task is always held by
someone the run can ask (see :meth:`held_ids`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import Any, Callable

import ray
from ray.exceptions import RayActorError

__all__ = ["PARKED_SHARE", "Outbox"]

log = logging.getLogger(__name__)

_REAP_S = 0.25  # how often delivery receipts are collected while messages flow
PARKED_SHARE = 0.05  # tasks waiting in the outbox, as a share of the tasks the actor holds
_RATE_HALF_LIFE_S = 1.0  # smoothing of the message rate the window is sized from

# Returns the receivers of a destination (actor handles); called lazily so a
# restarted actor finds its peers by name without help from the driver.
Resolver = Callable[[str], list[Any]]


class Outbox:
    def __init__(
        self,
        resolve: Resolver,
        batch_size: int = 64,
        wait_s: float = 0.005,
        id_of: Callable[[Any], str] = lambda m: m.id,
        load: Callable[[], int] | None = None,
        min_wait_s: float = 0.001,
    ) -> None:
        self._resolve = resolve
        self._batch_size = batch_size
        self._wait_s = wait_s
        self._min_wait_s = min(min_wait_s, wait_s)
        self._load = load
        """Tasks the owner holds (running + queued); None: a fixed window of ``wait_s``."""
        self._id_of = id_of
        self._puts = 0
        self._rate = 0.0  # messages/s, smoothed
        self._rate_at = time.monotonic()
        self.sends = 0
        """Ray calls made (batches sent)."""
        self._buf: dict[str, list[Any]] = defaultdict(list)
        self._sending: dict[Any, tuple[str, list[Any]]] = {}  # ObjectRef -> (dest, batch)
        self._rr: dict[str, int] = defaultdict(int)
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._next_reap = 0.0

    def put(self, dest: str, message: Any) -> None:
        buf = self._buf[dest]
        buf.append(message)
        self._puts += 1
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._flush_loop())
        if len(buf) >= self._batch_size:
            self._send(dest, self._buf.pop(dest))
        else:
            self._wake.set()

    def held_ids(self) -> list[str]:
        ids = [self._id_of(m) for buf in self._buf.values() for m in buf]
        ids.extend(self._id_of(m) for _, batch in self._sending.values() for m in batch)
        return ids

    async def _flush_loop(self) -> None:
        while True:
            if not self._buf and not self._sending:
                await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self.window())
            for dest in list(self._buf):
                self._send(dest, self._buf.pop(dest))
            if time.monotonic() >= self._next_reap:
                self._reap()

    def _send(self, dest: str, messages: list[Any]) -> None:
        receivers = self._resolve(dest)
        for lo in range(0, len(messages), self._batch_size):
            batch = messages[lo : lo + self._batch_size]
            receiver = receivers[self._rr[dest] % len(receivers)]
            self._rr[dest] += 1
            self.sends += 1
            self._sending[receiver.receive.remote(batch)] = (dest, batch)

    def window(self) -> float:
        """How long the next batch may gather: parked ≈ rate × window / 2 ≤ PARKED_SHARE × held."""
        now = time.monotonic()
        elapsed = now - self._rate_at
        if elapsed > 0:
            keep = 0.5 ** (elapsed / _RATE_HALF_LIFE_S)
            self._rate = keep * self._rate + (1 - keep) * self._puts / elapsed
            self._puts, self._rate_at = 0, now
        if self._load is None:
            return self._wait_s
        if self._rate <= 0:
            return self._min_wait_s
        return max(self._min_wait_s, min(self._wait_s, 2 * PARKED_SHARE * self._load() / self._rate))

    def _reap(self) -> None:
        """Collect delivery receipts with one ``ray.wait``, at most every ``_REAP_S``
        while traffic flows: awaiting each ObjectRef costs a cross-thread wake-up
        per send, and every Ray API call has a fixed Python cost."""
        self._next_reap = time.monotonic() + _REAP_S
        if not self._sending:
            return
        refs = list(self._sending)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        for ref in ready:
            dest, batch = self._sending.pop(ref)
            try:
                ray.get(ref)
            except RayActorError as exc:
                # The receiver is gone for good (restarts exhausted): re-route its batch.
                log.warning("delivery to %s failed (%s); re-sending %d message(s)", dest, exc.__class__.__name__, len(batch))
                self._buf[dest].extend(batch)
                self._wake.set()
