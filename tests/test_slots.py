"""Request slots: waiting for one costs O(1) per released slot, FIFO, with limits,
stickiness, endpoint changes, deadlines and cancellation (no HTTP needed: pure asyncio)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from matrix_hpc.services.llm.client import ChatClient, LLMError
from matrix_hpc.services.llm.slots import NoSlot, Slots

A, B = "http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1"


class CountingLoop(asyncio.SelectorEventLoop):
    """Counts callbacks scheduled: every coroutine wake-up goes through ``call_soon``."""

    callbacks = 0

    def call_soon(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        self.callbacks += 1
        return super().call_soon(*args, **kwargs)


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    loop = CountingLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


async def settle(rounds: int = 3) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


def _work_per_release(n_waiters: int, releases: int = 50) -> tuple[float, float, list[int]]:
    """(loop callbacks, routing picks) per released slot with ``n_waiters`` parked, and wake order."""

    async def main() -> tuple[float, float, list[int]]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, CountingLoop)
        client = ChatClient([A, B], max_outstanding_per_endpoint=2, timeout_s=600)
        deadline = time.monotonic() + 600
        held = [await client._acquire(None, None, deadline) for _ in range(4)]  # both endpoints full
        woke: list[int] = []

        async def waiter(i: int) -> None:
            woke.append((i, await client._acquire(None, None, deadline))[0])

        tasks = [loop.create_task(waiter(i)) for i in range(n_waiters)]
        await settle()
        assert not woke and client.slots.waiting == n_waiters
        calls0, picks0 = loop.callbacks, client.slots.picks
        for k in range(releases):
            client.slots.release(held[k % 4])
            await settle()
        per_call = (loop.callbacks - calls0) / releases
        per_pick = (client.slots.picks - picks0) / releases
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return per_call, per_pick, woke

    return run(main)  # type: ignore[no-any-return]


def test_work_per_released_slot_does_not_grow_with_waiters() -> None:
    few = _work_per_release(10, releases=8)
    many = _work_per_release(20_000, releases=50)
    # One release wakes one waiter: the same handful of callbacks and one routing
    # decision whether 10 or 20,000 callers wait (notify_all would wake all of them).
    assert many[0] <= few[0] + 0.5 and many[0] <= 4, (few, many[:2])
    assert many[1] <= 2.0 and many[1] == few[1], (few[1], many[1])  # the handed-over one, then the next finds none
    assert many[2] == list(range(50)) and few[2] == list(range(8))  # first come, first served


def test_prefer_routes_among_free_endpoints_and_a_full_one_overflows() -> None:
    async def main() -> None:
        slots = Slots(per_endpoint=2)
        slots.set_endpoints([A, B])
        deadline = time.monotonic() + 5
        got = [await slots.acquire(B, None, deadline) for _ in range(3)]
        assert got[:2] == [B, B] and got[2] == A  # sticky while B has room, then the other
        got.append(await slots.acquire(None, None, deadline))
        assert slots.outstanding == {A: 2, B: 2}
        late = asyncio.ensure_future(slots.acquire(B, None, deadline))
        await settle()
        assert not late.done()
        slots.release(A)  # the waiter prefers B, but A is what is free: it takes A
        assert await late == A and slots.outstanding == {A: 2, B: 2}

    run(main)


def test_deadline_cancellation_and_a_grant_racing_a_cancel_leak_no_slot() -> None:
    async def main() -> None:
        slots = Slots(per_endpoint=1)
        slots.set_endpoints([A])
        far = time.monotonic() + 5
        assert await slots.acquire(None, None, far) == A
        with pytest.raises(NoSlot) as err:
            await slots.acquire(None, None, time.monotonic() + 0.05)
        assert not err.value.unreachable  # at its limit, not down
        cancelled = asyncio.ensure_future(slots.acquire(None, None, far))
        racing = asyncio.ensure_future(slots.acquire(None, None, far))
        last = asyncio.ensure_future(slots.acquire(None, None, far))
        await settle()
        cancelled.cancel()
        await settle()
        slots.release(A)  # skips the cancelled and the timed-out waiter: goes to `racing`
        racing.cancel()  # ...which is cancelled before it runs: its slot must come back
        await settle()
        assert racing.cancelled() and await asyncio.wait_for(last, 1) == A
        assert slots.outstanding[A] == 1 and slots.waiting == 0

    run(main)


def test_endpoints_appearing_disappearing_and_coming_back_from_unreachable() -> None:
    async def main() -> None:
        slots = Slots(per_endpoint=1)
        far = time.monotonic() + 5
        first = [asyncio.ensure_future(slots.acquire(None, None, far)) for _ in range(3)]
        await settle()
        slots.set_endpoints([A, B])  # two slots appear: the two oldest waiters get them
        await settle()
        assert [f.done() for f in first] == [True, True, False]
        assert {first[0].result(), first[1].result()} == {A, B}
        slots.set_endpoints([B])  # A leaves routing: its request finishes, its slot is not reused
        slots.release(A)
        await settle()
        assert not first[2].done() and slots.outstanding[A] == 0
        slots.mark_unreachable(B, 0.2)  # B refused a connection: out of routing for a while
        slots.release(B)  # (the client marks before it releases, as here)
        await settle()
        assert not first[2].done()
        assert await asyncio.wait_for(first[2], 2) == B  # no release needed: a timer re-checks
        with pytest.raises(NoSlot) as err:
            await Slots(1).acquire(None, None, time.monotonic() + 0.05)
        assert err.value.unreachable

    run(main)


def test_client_error_names_the_cause() -> None:
    async def main() -> None:
        with pytest.raises(LLMError, match="every endpoint stayed at its request limit"):
            client = ChatClient([A], max_outstanding_per_endpoint=1, timeout_s=0.1)
            await client._acquire(None, None, time.monotonic() + 5)
            await client._acquire(None, None, time.monotonic() + 0.1)

    run(main)
