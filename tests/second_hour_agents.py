"""Agents for the second-hour tests (issue 26): the user's "explain like I'm five" workflow,
with the mistakes they made on purpose. No LLM is called: the runs are fast."""

from __future__ import annotations

import threading

from matrix_hpc.agents import Agent, Task


class Writer(Agent):
    """Drafts an explanation (a template), then hands it to the role ``next`` names."""

    uses_llm = False

    async def step(self, task: Task) -> None:
        task.state["draft"] = f"{task.row['concept']} is like a toy."
        task.next_role = self.params.get("next", "critic")


class Critic(Agent):
    """Accepts every draft."""

    uses_llm = False

    async def step(self, task: Task) -> None:
        task.finish({"explanation": task.state["draft"], "accepted": True})


class ForgetfulWriter(Agent):
    """The user's bug: ``self.chat(...)`` without ``await`` leaves a coroutine in the state
    (a row with ``lock`` set leaves a lock there instead: not a coroutine, not picklable)."""

    async def step(self, task: Task) -> None:
        if task.row.get("lock"):
            task.state["draft"] = threading.Lock()
            task.next_role = "critic"
            return
        task.state["draft"] = self.chat(task, [{"role": "user", "content": f"Explain {task.row['concept']} to a five-year-old."}])
        task.next_role = "critic"
