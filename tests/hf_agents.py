"""A no-LLM agent for the Hugging Face dataset tests: slow enough that a run can be killed
with some rows committed and others not (importable by Ray workers: the repository root is
on PYTHONPATH in those tests)."""

from __future__ import annotations

import asyncio

from matrix_hpc.agents import Agent, Task


class Copy(Agent):
    """Finishes each task with its row's ``question`` after ``params.delay_s``."""

    uses_llm = False

    async def step(self, task: Task) -> None:
        await asyncio.sleep(float(self.params.get("delay_s", 0.0)))
        task.finish({"question": task.row.get("question"), "n": task.row.get("n")})
