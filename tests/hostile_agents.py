"""Agents for the hostile-data tests (no LLM): they carry a row's text into the result
and into error messages, the two other ways text enters a record.

Importable by Ray workers when the repository root is on PYTHONPATH (the tests set it).
"""

from __future__ import annotations

from matrix_hpc.agents import Agent, Task


class Echo(Agent):
    """Finishes each task with its row's ``text`` in the result; a row with ``"fail": true``
    fails instead, with the text in the error message."""

    uses_llm = False

    async def step(self, task: Task) -> None:
        text = str(task.row.get("text", ""))
        if task.row.get("fail"):
            task.fail("echo_refused", f"refused {text}")
        else:
            task.finish({"echo": text, "len": len(text)})


class Ask(Agent):
    """One LLM call with the row's ``text`` as the prompt; the reply is the result."""

    async def step(self, task: Task) -> None:
        reply = await self.chat(task, [{"role": "user", "content": str(task.row["text"])}])
        task.finish({"reply_chars": len(reply), "head": reply[:40]})
