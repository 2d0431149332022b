"""Relay agents: each step only routes the task on, ``hops`` times in all (no LLM)."""

from __future__ import annotations

import asyncio
import random

from matrix_hpc.agents import Agent, Task


class Relay(Agent):
    """params: ``next`` (the role to hand to), ``hops`` (steps per task before it
    finishes), ``sleep_s`` (mean simulated work per step, 0 = none)."""

    uses_llm = False

    async def step(self, task: Task) -> None:
        sleep_s = float(self.params.get("sleep_s", 0))
        if sleep_s:
            await asyncio.sleep(random.uniform(0, 2 * sleep_s))
        if task.hops >= int(self.params.get("hops", 10)):
            task.finish({"hops": task.hops})
        else:
            task.next_role = self.params["next"]
