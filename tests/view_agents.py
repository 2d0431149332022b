"""Agents for the viewer's tests: collab-reasoning's Speaker (a real LLM call per turn),
with rows that fail on purpose and rows held back until the test lets them go.

Importable by Ray workers through ``workflow.python_path`` (the repository root).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

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


def gated_collab_job(tmp: Path, dataset: Path, gate: Path | None = None) -> Path:
    """A job file for the viewer's and the terminal's tests: the bundled collab workflow on
    the embedded engine, short dialogues, :class:`GatedSpeaker` as both speakers (``gate``:
    the file that lets gated rows go)."""
    repo = Path(__file__).resolve().parent.parent
    cfg = yaml.safe_load((repo / "workflows" / "collab_reasoning" / "config.yaml").read_text())
    cfg["dataset"].update(path=str(dataset), limit=None)
    cfg["output"] = {"path": str(tmp / "out"), "flush_interval_s": 0.2}
    cfg["llm"]["max_tokens"] = 8
    cfg["llm"]["embedded"]["n_parallel"] = 8
    cfg["workflow"]["python_path"] = [str(repo)]
    cfg["workflow"]["params"]["max_turns"] = 2
    for role in ("teacher", "student"):
        cfg["workflow"]["roles"][role]["agent"] = "tests.view_agents:GatedSpeaker"
        if gate is not None:
            cfg["workflow"]["roles"][role]["params"]["gate"] = str(gate)
    cfg["run"] = {"max_in_flight": 16, "progress": "log", "progress_interval_s": 2.0}
    (tmp / "job.yaml").write_text(yaml.safe_dump(cfg))
    return tmp / "job.yaml"
