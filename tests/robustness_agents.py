"""Agents for the runtime-robustness tests (issue 20): real misbehaviour, no mocks.

Importable by Ray workers when the repository root is on PYTHONPATH (the tests set it).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time

from matrix_hpc.agents import Agent, Task


class SetupFailsAfter(Agent):
    """Finishes each task after ``sleep_s``. Its ``setup()`` succeeds for the first
    ``ok_setups`` actors (counted in the file ``count``, under an flock) and fails for
    every later one: the team's start-up passes, an actor restarted by Ray fails."""

    uses_llm = False

    async def setup(self) -> None:
        fd = os.open(self.params["count"], os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            n = len(os.pread(fd, 4096, 0).split(b"\n")) - 1
            os.pwrite(fd, b"setup\n", n * len(b"setup\n"))
        finally:
            os.close(fd)
        if n >= int(self.params["ok_setups"]):
            raise RuntimeError(f"cannot open the resource (setup #{n + 1})")

    async def step(self, task: Task) -> None:
        await asyncio.sleep(float(self.params.get("sleep_s", 0.05)))
        task.finish({"pid": os.getpid()})


class OneCall(Agent):
    """One LLM call per task, then finished (what a batch executed twice would pay twice)."""

    async def step(self, task: Task) -> None:
        text = await self.chat(task, [{"role": "user", "content": f"Say something about {task.id}."}])
        task.finish({"text": text})


class Relay(Agent):
    """Routes every task to ``next`` at once (no LLM)."""

    uses_llm = False

    async def step(self, task: Task) -> None:
        task.next_role = self.params["next"]


class FinishOrHang(Agent):
    """Finishes tasks whose number is below ``finish_below`` (appending each id to the file
    ``finished``), and holds the others forever; its ``close()`` writes the file
    ``closing`` and then takes ``close_s`` (a slow clean-up)."""

    uses_llm = False

    async def step(self, task: Task) -> None:
        if int(str(task.id).lstrip("t")) >= int(self.params["finish_below"]):
            await asyncio.Event().wait()
        with open(self.params["finished"], "a") as fh:
            fh.write(f"{task.id}\n")
        task.finish({"ok": True})

    async def close(self) -> None:
        with open(self.params["closing"], "a") as fh:
            fh.write(f"{time.time()}\n")
        await asyncio.sleep(float(self.params.get("close_s", 60.0)))
