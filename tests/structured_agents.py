"""Agents for tests/test_structured_output.py: a critic whose verdict is JSON."""

from __future__ import annotations

from matrix_hpc.agents import Agent, Task


class Critic(Agent):
    """Asks for a verdict on the row's text; the role's ``sampling.response_format`` shapes it."""

    async def step(self, task: Task) -> None:
        verdict = await self.chat_json(task, [{"role": "user", "content": f"Rate this text from 0 to 10: {task.row['text']}"}])
        task.finish({"verdict": verdict})
