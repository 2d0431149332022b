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

A batch has one re-send path: Ray's. ``receive`` is retried by Ray on the receiver's
next incarnation (``max_task_retries=-1``) when the receiver crashes, and fails with
``ActorDiedError`` once it is gone for good (restarts used up, or its node declared
dead with nowhere to restart it), which the outbox then sends to the role's other
instances. The outbox never re-sends a delivery that is merely slow (a long GC pause,
a frozen host): Ray still delivers the original, and a copy would run the batch twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import ActorDiedError

from .agent import first_line

__all__ = ["PARKED_SHARE", "Outbox"]

log = logging.getLogger(__name__)

_REAP_S = 0.25  # how often delivery receipts are collected while messages flow
_ERROR_PAUSE_S = 0.5  # after an unexpected error in the flush loop: no hot spin
# ``receive`` only enqueues: a delivery unanswered this long is said once (the receiver is
# frozen, or on a node Ray has not yet declared dead), never re-sent (see the module doc).
_SLOW_SEND_S = 30.0
PARKED_SHARE = 0.10  # tasks waiting in the outbox, as a share of the tasks the actor holds
_RATE_HALF_LIFE_S = 1.0  # smoothing of the message rate the window is sized from

# Returns the receivers of a destination (actor handles, None for one that is gone
# for good); called lazily so a restarted actor finds its peers by name without
# help from the driver.
Resolver = Callable[[str], list[Any]]
# Called with (dest, message, exception) for a message that cannot be serialized.
Unsendable = Callable[[str, Any, Exception], None]


class Outbox:
    """Batches per destination role; round-robin over the role's live receivers.

    A receiver that is gone for good (Ray's restarts used up) is skipped from then
    on and its undelivered batches go to the others; a message that cannot be
    serialized is handed to ``on_unsendable`` on its own, and the rest of its batch
    goes on. While a role has no live receiver its messages stay here (held).
    """

    def __init__(
        self,
        resolve: Resolver,
        batch_size: int = 64,
        wait_s: float = 0.005,
        id_of: Callable[[Any], str] = lambda m: m.id,
        load: Callable[[], int] | None = None,
        min_wait_s: float = 0.001,
        on_unsendable: Unsendable | None = None,
    ) -> None:
        self._resolve = resolve
        self._batch_size = batch_size
        self._wait_s = wait_s
        self._min_wait_s = min(min_wait_s, wait_s)
        self._load = load
        """Tasks the owner holds (running + queued); None: a fixed window of ``wait_s``."""
        self._id_of = id_of
        self._on_unsendable = on_unsendable
        self._puts = 0
        self._rate = 0.0  # messages/s, smoothed
        self._rate_at = time.monotonic()
        self.sends = 0
        """Ray calls made (batches sent)."""
        self._buf: dict[str, list[Any]] = defaultdict(list)
        self._sending: dict[Any, tuple[str, int, list[Any]]] = {}  # ObjectRef -> (dest, receiver index, batch)
        self._sent_at: dict[Any, float] = {}  # ObjectRef -> when it was sent
        self._rr: dict[str, int] = defaultdict(int)
        self.dead: dict[str, set[int]] = defaultdict(set)
        """Receivers (by index) of each destination that are gone for good."""
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
        ids.extend(self._id_of(m) for _, _, batch in self._sending.values() for m in batch)
        return ids

    async def _flush_loop(self) -> None:
        while True:
            try:
                if not self._buf and not self._sending:
                    await self._wake.wait()
                self._wake.clear()
                await asyncio.sleep(self.window())
                for dest in list(self._buf):
                    self._send(dest, self._buf.pop(dest))
                if time.monotonic() >= self._next_reap:
                    self._reap()
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop carries every message of this actor: it must not die
                log.exception("outbox flush loop error (going on)")
                await asyncio.sleep(_ERROR_PAUSE_S)

    def _live(self, dest: str) -> list[tuple[int, Any]]:
        dead = self.dead[dest]
        return [(i, h) for i, h in enumerate(self._resolve(dest)) if h is not None and i not in dead]

    def _send(self, dest: str, messages: list[Any]) -> None:
        live = self._live(dest)
        if not live:  # every receiver is gone: keep them (held); the driver stops the run
            self._buf[dest].extend(messages)
            return
        for lo in range(0, len(messages), self._batch_size):
            batch = messages[lo : lo + self._batch_size]
            index, receiver = live[self._rr[dest] % len(live)]
            self._rr[dest] += 1
            self.sends += 1
            try:
                ref = receiver.receive.remote(batch)
                self._sending[ref], self._sent_at[ref] = (dest, index, batch), time.monotonic()
            except Exception as exc:  # a message that cannot be serialized (or a broken handle)
                self._send_one_by_one(dest, index, receiver, batch, exc)

    def _send_one_by_one(self, dest: str, index: int, receiver: Any, batch: list[Any], first: Exception) -> None:
        """Find the messages that cannot be sent; send the others on their own."""
        # The first line only: Ray's serialization error runs to dozens of coloured lines (the
        # message that cannot be sent puts the whole report in agents.log).
        log.warning("a batch to %s could not be sent (%s: %s); sending its %d message(s) one by one", dest, type(first).__name__, first_line(first), len(batch))
        for message in batch:
            self.sends += 1
            try:
                ref = receiver.receive.remote([message])
                self._sending[ref], self._sent_at[ref] = (dest, index, [message]), time.monotonic()
            except Exception as exc:
                if self._on_unsendable is None:
                    raise
                self._on_unsendable(dest, message, exc)

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
        ready, waiting = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        slow_before = time.monotonic() - _SLOW_SEND_S
        for ref in waiting:
            if self._sent_at.get(ref, float("inf")) < slow_before:
                dest, index, batch = self._sending[ref]
                del self._sent_at[ref]  # said once per delivery
                log.warning(
                    "delivery of %d message(s) to %s instance %d unanswered for %.0fs (frozen, or its node is being declared dead); "
                    "Ray delivers it when the receiver answers or restarts, or fails it if it is gone for good", len(batch), dest, index, _SLOW_SEND_S,
                )  # fmt: skip
        for ref in ready:
            self._sent_at.pop(ref, None)
            dest, index, batch = self._sending.pop(ref)
            try:
                ray.get(ref)
            except Exception as exc:
                if isinstance(exc, ActorDiedError):
                    self.dead[dest].add(index)  # restarts exhausted: never again
                    log.warning("%s instance %d is gone for good; its %d message(s) go to the others", dest, index, len(batch))
                else:  # the receiver refused or failed: it did not take the batch
                    log.warning("delivery to %s failed (%s); re-sending %d message(s)", dest, type(exc).__name__, len(batch))
                self._buf[dest].extend(batch)
                self._wake.set()
