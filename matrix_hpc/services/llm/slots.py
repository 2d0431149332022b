"""Request slots over one model's endpoints: routing, per-endpoint limits and a FIFO of waiters.

A caller :meth:`Slots.acquire`\\ s an endpoint with room or joins a FIFO queue; each
:meth:`Slots.release` (or endpoint change) hands freed room to the queue's head, so
waiting costs O(1) per released slot however many callers wait. Invariant: callers
wait only while no routable endpoint has room, so any waiter can take any freed slot
(``prefer``/``exclude`` only rank endpoints that have room). ``total`` caps the slots
taken over all endpoints together (the client's connections): at the cap no endpoint has room.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from dataclasses import dataclass

__all__ = ["NoSlot", "Slots"]


class NoSlot(Exception):
    """``acquire`` passed its deadline; ``unreachable`` says whether every endpoint was down."""

    def __init__(self, unreachable: bool) -> None:
        super().__init__("no slot")
        self.unreachable = unreachable


@dataclass(slots=True)
class _Waiter:
    fut: asyncio.Future[str]
    prefer: str | None
    exclude: str | None


class Slots:
    def __init__(self, per_endpoint: int, total: int | None = None) -> None:
        self.per_endpoint = per_endpoint
        self.total = total
        """Requests open at once over every endpoint (the client's connection cap); None: no cap."""
        self.in_use = 0
        self.base_urls: list[str] = []
        self.outstanding: dict[str, int] = {}
        self.cool_until: dict[str, float] = {}
        """Endpoints that answered 429/503: used only when nothing else has room, until then."""
        self.unreachable_until: dict[str, float] = {}
        """Endpoints a connection failed to, left out of routing until then (or until listed anew)."""
        self._waiters: deque[_Waiter] = deque()
        self.handoffs = 0
        """Slots handed to a waiting caller (each wakes exactly one coroutine)."""
        self.picks = 0
        """Routing decisions made (a measure of the work waiting costs; see the tests)."""

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.fut.done())

    def set_endpoints(self, urls: list[str]) -> None:
        listed = set(self.base_urls)
        self.base_urls = [u.rstrip("/") for u in urls]
        for u in self.base_urls:
            if u not in listed:  # back in routing (e.g. restarted): reachable again
                self.unreachable_until.pop(u, None)
            self.outstanding.setdefault(u, 0)
        self._hand_over()

    def pick(self, prefer: str | None, exclude: str | None) -> str | None:
        """An endpoint with room, or None. Cooling endpoints only when nothing else has room."""
        self.picks += 1
        if self.total is not None and self.in_use >= self.total:
            return None
        now = time.monotonic()
        room = [u for u in self.base_urls if self.outstanding[u] < self.per_endpoint and self.unreachable_until.get(u, 0.0) <= now]
        if prefer in room and self.cool_until.get(prefer, 0.0) <= now:  # type: ignore[operator]
            return prefer
        warm = [u for u in room if self.cool_until.get(u, 0.0) <= now]
        choices = [u for u in warm if u != exclude] or warm or [u for u in room if u != exclude] or room
        if not choices:
            return None
        low = min(self.outstanding[u] for u in choices)
        return random.choice([u for u in choices if self.outstanding[u] == low])

    def has_alternative(self, url: str | None) -> bool:
        now = time.monotonic()
        return any(
            u != url and max(self.cool_until.get(u, 0.0), self.unreachable_until.get(u, 0.0)) <= now and self.outstanding[u] < self.per_endpoint
            for u in self.base_urls
        )  # fmt: skip

    def any_reachable(self) -> bool:
        now = time.monotonic()
        return any(self.unreachable_until.get(u, 0.0) <= now for u in self.base_urls)

    async def acquire(self, prefer: str | None, exclude: str | None, deadline: float) -> str:
        """An endpoint slot (counted as outstanding until :meth:`release`); FIFO behind
        earlier waiters. Raises :class:`NoSlot` at ``deadline``."""
        if not self._waiters:  # fast path; with a queue, a newcomer joins it (FIFO)
            url = self.pick(prefer, exclude)
            if url is not None:
                self.outstanding[url] += 1
                self.in_use += 1
                return url
        waiter = _Waiter(asyncio.get_running_loop().create_future(), prefer, exclude)
        self._waiters.append(waiter)
        self._hand_over()  # the head may be a stale (timed-out) waiter while room is free
        try:
            async with asyncio.timeout_at(_loop_time(deadline)):
                return await waiter.fut
        except BaseException as exc:
            # A slot handed over just as the deadline passed or the caller was cancelled.
            granted = waiter.fut.done() and not waiter.fut.cancelled()
            if isinstance(exc, TimeoutError):
                if granted:
                    return waiter.fut.result()
                raise NoSlot(not self.any_reachable()) from None
            if granted:
                self.release(waiter.fut.result())
            raise

    def release(self, url: str) -> None:
        self.outstanding[url] -= 1
        self.in_use -= 1
        if self._waiters:
            self._hand_over()

    def mark_unreachable(self, url: str, for_s: float) -> None:
        """Leave ``url`` out of routing for ``for_s``; waiters get it back then (one timer per mark)."""
        self.unreachable_until[url] = time.monotonic() + for_s
        try:
            asyncio.get_running_loop().call_later(for_s + 0.01, self._hand_over)
        except RuntimeError:  # no loop: nobody can be waiting
            pass

    def _hand_over(self) -> None:
        """Give free room to waiters, oldest first; stops at the first that finds none,
        since (by the invariant) no later waiter would find any either."""
        while self._waiters:
            head = self._waiters[0]
            if head.fut.done():  # timed out or cancelled: drop it (each waiter is popped once)
                self._waiters.popleft()
                continue
            url = self.pick(head.prefer, head.exclude)
            if url is None:
                return
            self._waiters.popleft()
            self.outstanding[url] += 1
            self.in_use += 1
            self.handoffs += 1
            head.fut.set_result(url)


def _loop_time(deadline: float) -> float:
    """A ``time.monotonic`` deadline on the running loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline - time.monotonic())
