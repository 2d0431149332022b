"""Agents for tests/test_token_ids.py: a two-turn dialogue of one role, then a role that asks for no tokens."""

from __future__ import annotations

from matrix_hpc.agents import Agent, Task


class Talker(Agent):
    """Asks for a colour, then for another one in the same dialogue (its first reply as the assistant's)."""

    async def step(self, task: Task) -> None:
        messages = [{"role": "user", "content": f"Name a colour for {task.row['text']}."}]
        first = await self.chat(task, messages)
        messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "And another one?"}]
        second = await self.chat(task, messages)
        task.state["answers"] = [first, second]
        task.next_role = "plain"


class Plain(Agent):
    async def step(self, task: Task) -> None:
        word = await self.chat(task, [{"role": "user", "content": "Say yes."}])
        task.finish({"answers": [*task.state["answers"], word]})
