"""Batched, peer-to-peer delivery between actors.

One Ray call costs ~0.5 ms of CPU here, so messages to the same destination role
are gathered and sent as one list per call: a batch leaves when it is full or
when its oldest message has waited ``wait_s``. Until the receiver has accepted a
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

__all__ = ["Outbox"]

log = logging.getLogger(__name__)

_REAP_S = 0.25  # how often delivery receipts are collected while messages flow

# Returns the receivers of a destination (actor handles); called lazily so a
# restarted actor finds its peers by name without help from the driver.
Resolver = Callable[[str], list[Any]]


class Outbox:
    def __init__(self, resolve: Resolver, batch_size: int = 64, wait_s: float = 0.005, id_of: Callable[[Any], str] = lambda m: m.id) -> None:
        self._resolve = resolve
        self._batch_size = batch_size
        self._wait_s = wait_s
        self._id_of = id_of
        self._buf: dict[str, list[Any]] = defaultdict(list)
        self._sending: dict[Any, tuple[str, list[Any]]] = {}  # ObjectRef -> (dest, batch)
        self._rr: dict[str, int] = defaultdict(int)
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._next_reap = 0.0

    def put(self, dest: str, message: Any) -> None:
        buf = self._buf[dest]
        buf.append(message)
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
            await asyncio.sleep(self._wait_s)
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
            self._sending[receiver.receive.remote(batch)] = (dest, batch)

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
