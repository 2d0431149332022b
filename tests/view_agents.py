"""Agents for the viewer's tests: collab-reasoning's Speaker (a real LLM call per turn),
with rows that fail on purpose and rows held back until the test lets them go.

Importable by Ray workers through ``workflow.python_path`` (the repository root).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

from matrix_hpc.agents import Task
from workflows.collab_reasoning.agents import Speaker


class GatedSpeaker(Speaker):
    """A row with ``"boom": true`` raises (an ``agent_error`` with its traceback); a row with
    ``"gate": true`` waits before its first turn until the file ``params.gate`` exists, so
    the run stays live, with the other rows committed, for as long as the test wants."""

    @dataclass
    class Params(Speaker.Params):
        gate: str = ""
        """The file whose existence lets the gated rows go."""

    async def step(self, task: Task) -> None:
        if not task.turns:
            if task.row.get("boom"):
                raise RuntimeError(f"boom on row {task.id}")
            while task.row.get("gate") and not os.path.exists(self.params.gate):
                await asyncio.sleep(0.1)
        await super().step(task)
