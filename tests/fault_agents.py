"""Agents that misbehave on purpose, for the reliability tests (no LLM).

Importable by Ray workers when the repository root is on PYTHONPATH (the tests set it).
"""

from __future__ import annotations

import asyncio
import os
import threading

from matrix_hpc.agents import Agent, Task


class Unpicklable(Agent):
    """Routes every task to ``next``; tasks whose number is divisible by ``every`` carry
    a lock in their state, which cannot be pickled (their hand-over must fail alone)."""

    uses_llm = False

    async def step(self, task: Task) -> None:
        if int(str(task.id).lstrip("t")) % int(self.params.get("every", 5)) == 0:
            task.state["lock"] = threading.Lock()
        task.next_role = self.params["next"]


class BrokenInit(Agent):
    """An inline role whose constructor raises inside another role's actor (the
    runtime's own path fails there). Its own actor, built first at team start, is
    let through by claiming the ``marker`` file; every later build raises."""

    uses_llm = False

    def __init__(self, ctx) -> None:  # type: ignore[no-untyped-def]
        try:
            os.close(os.open(ctx.params["marker"], os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            raise RuntimeError("BrokenInit cannot be built") from None
        super().__init__(ctx)

    async def step(self, task: Task) -> None:  # pragma: no cover - never built
        task.finish({})


class HangOn(Agent):
    """Finishes tasks, except those whose id is in ``hang`` (a list): those wait forever."""

    uses_llm = False

    async def step(self, task: Task) -> None:
        if task.id in set(self.params.get("hang", [])):
            await asyncio.Event().wait()
        task.finish({"ok": True})


class Slow(Agent):
    """Finishes each task after ``sleep_s``, or routes it to ``next`` if given."""

    uses_llm = False

    async def step(self, task: Task) -> None:
        await asyncio.sleep(float(self.params.get("sleep_s", 0.05)))
        nxt = self.params.get("next")
        if nxt and task.hops < 2:
            task.next_role = nxt
        else:
            task.finish({"hops": task.hops})


class SlowSetup(Agent):
    """Finishes tasks; its ``setup()`` takes a while (as opening a client would). Each
    build and each close appends ``setup|close PID OBJECT-ID`` to the file ``log``;
    with ``fail_setup`` its setup() raises."""

    uses_llm = False

    def _note(self, what: str) -> None:
        with open(self.params["log"], "a") as fh:
            fh.write(f"{what} {os.getpid()} {id(self)}\n")

    async def setup(self) -> None:
        await asyncio.sleep(0.3)
        if self.params.get("fail_setup"):
            raise RuntimeError("cannot open the inline resource")
        self._note("setup")

    async def close(self) -> None:
        self._note("close")

    async def step(self, task: Task) -> None:
        task.finish({"ok": True})
