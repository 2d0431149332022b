"""The example of docs/writing-a-workflow.md runs as the guide says, and the guide quotes it verbatim.

The code the guide shows is checked against the files it comes from (a line
``<!-- from PATH -->`` before a code block), so neither can drift from the other.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from matrix_hpc.agents import AgentContext, Task
from matrix_hpc.config import load_config
from matrix_hpc.runtime.loader import check_workflow_code

from .conftest import REPO, store_records

GUIDE = REPO / "docs" / "writing-a-workflow.md"
EXAMPLE = REPO / "docs" / "examples" / "guide_workflow"
CONFIG = EXAMPLE / "config.yaml"


def quoted_blocks() -> list[tuple[str, str]]:
    """(source path, code) for every code block the guide marks as quoted from a file."""
    pattern = re.compile(r"<!-- from (\S+) -->\n```[a-z]*\n(.*?)```", re.S)
    return pattern.findall(GUIDE.read_text())


def test_guide_quotes_the_example_verbatim() -> None:
    blocks = quoted_blocks()
    assert {p for p, _ in blocks} >= {
        "docs/examples/guide_workflow/config.yaml",
        "docs/examples/guide_workflow/guide_agents.py",
        "tests/test_guide_workflow.py",
    }
    for path, code in blocks:
        assert code in (REPO / path).read_text(), f"the guide's quote of {path} is not in that file:\n{code}"


@pytest.fixture
def guide_agents(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setattr(sys, "path", list(sys.path))
    check_workflow_code(load_config(CONFIG))  # puts the example's folder on the path, as a run does
    import guide_agents

    yield guide_agents
    sys.modules.pop("guide_agents", None)


# --- quoted in the guide: "Test a workflow quickly" ---
def test_checker_sends_a_short_explanation_back_then_gives_up(guide_agents: Any) -> None:
    checker = guide_agents.Checker(AgentContext("checker", {"min_chars": 20, "max_tries": 2}))
    task = Task(id="c1", row={"concept": "gravity", "keyword": "pull"}, next_role="checker")
    task.state.update(tries=1, explanation="Too short.")
    asyncio.run(checker.step(task))
    assert task.next_role == "writer"  # one more try
    task.state.update(tries=2)
    asyncio.run(checker.step(task))
    assert task.done and task.result["accepted"] is False


# --- end of quote ---


@pytest.mark.slow
def test_guide_workflow_runs_with_two_models_and_their_sampling(tmp_path: Path, run_factory: Any) -> None:
    run = run_factory(CONFIG, f"output.path={tmp_path / 'out'}", "run.progress=log")
    assert run.wait(timeout=400) == 0, run.output[-3000:]
    records = store_records(tmp_path / "out")
    assert sorted(r["id"] for r in records) == [f"c{i}" for i in range(1, 7)]
    assert all(r["status"] == "ok" for r in records), [r["error"] for r in records if r["error"]]
    turns = [t for r in records for t in r["turns"]]
    writer = [t for t in turns if t["role"] == "writer"]
    grader = [t for t in turns if t["role"] == "grader"]
    assert writer and grader
    # Each role's calls went to its own model, with its own sampling, and say so on the turn.
    assert all(t["model"] == "writer_llm" and t["served_model"] == "writer_llm" and t["max_tokens"] == 48 and t["temperature"] == 0.8 for t in writer)
    assert all(t["model"] == "grader_llm" and t["served_model"] == "grader_llm" and t["max_tokens"] == 4 and t["temperature"] == 0.0 for t in grader)
    for r in records:
        res = r["result"]
        assert set(res) >= {"explanation", "tries", "mentions_keyword", "accepted"}
        assert (res["accepted"] and "grade" in res) or (not res["accepted"] and res["reason"])
        assert r["usage"]["by_model"]["writer_llm"]["calls"] == res["tries"]
    assert "  store:     metrics accepted=" in run.output  # workflow.metrics, in the summary
