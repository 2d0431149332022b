"""Agents for the first-hour tests: no LLM, a bug on some rows, optional slowness."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from typing import Any

from matrix_hpc.agents import Agent, Task


def parse_answer(text: str) -> str:
    # The user's bug: assumes every reply has a colon.
    return text.split(":")[1].strip()


class Answerer(Agent):
    """params: ``sleep_s`` per step; ``crash_marker``: the first task to see that this file
    does not exist creates it and kills its actor process (a segfault, an OOM kill).
    Rows whose ``text`` has no colon raise IndexError."""

    uses_llm = False

    async def step(self, task: Task) -> None:
        marker = self.params.get("crash_marker")
        if marker and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        await asyncio.sleep(float(self.params.get("sleep_s", 0)))
        task.finish({"answer": parse_answer(task.row["text"]), "meta": {"len": len(task.row["text"])}})


def metrics(records: Iterable[dict[str, Any]]) -> dict[str, int]:
    """The user's workflow metrics: answered and broken rows."""
    answered = broken = 0
    for rec in records:
        answered += rec["status"] == "ok"
        broken += rec["status"] == "failed"
    return {"answered": answered, "broken": broken}
