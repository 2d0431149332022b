"""Agents for the retry tests (issue 26, "Failed records can be retried"): the user's code
has bugs that fail some rows; a file (``fixed``, a param) is their fix, so the same command
runs the buggy or the fixed code path without editing a config.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from matrix_hpc.agents import Agent, Task


class Explainer(Agent):
    """Asks the LLM for an explanation; rows marked ``crash`` raise (agent_error) and rows
    marked ``short`` fail as ``too_short`` until the file ``fixed`` exists."""

    async def step(self, task: Task) -> None:
        text = await self.chat(task, [{"role": "user", "content": f"Explain {task.row['concept']} in one line."}])
        fixed = Path(self.params["fixed"]).exists()
        if task.row.get("crash") and not fixed:
            raise RuntimeError(f"bug in post-processing of {task.id}")
        if task.row.get("short") and not fixed:
            task.fail("too_short", f"explanation of {task.id} is too short")
            return
        task.finish({"explanation": text, "fixed": fixed})


class SlowBuggy(Agent):
    """Calls no LLM; each task takes ``delay_s`` and raises until the file ``fixed`` exists."""

    uses_llm = False

    async def step(self, task: Task) -> None:
        await asyncio.sleep(float(self.params.get("delay_s", 0)))
        if not Path(self.params["fixed"]).exists():
            raise RuntimeError(f"bug in {task.id}")
        task.finish({"ok": True})


def metrics(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The workflow's metrics: how many records it was given, and how many of them are ok."""
    seen = ok = 0
    for rec in records:
        seen += 1
        ok += rec["status"] == "ok"
    return {"seen": seen, "ok": ok}
