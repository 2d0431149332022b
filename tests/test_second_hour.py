"""A researcher's second hour (issue 26): failures that stop early, agent bugs explained.

Each test does what the user did: runs ``matrix-hpc`` as a subprocess on a tiny workflow
of their own (tests/second_hour_agents.py, no LLM called) and checks the exit status and
the line it printed.
"""

from __future__ import annotations

import asyncio
import gc
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from matrix_hpc.runtime.awaitables import forgot_await
from matrix_hpc.runtime.task import Task

from .conftest import REPO, store_records, write_jsonl

AGENTS = "tests.second_hour_agents"
UNUSED_URL = "http://127.0.0.1:9/v1"  # nothing listens on the discard port: no LLM is called


def eli5_job(tmp: Path, n: int, writer: str = "Writer", **run: Any) -> Path:
    """The user's workflow: a writer hands each draft to a critic."""
    data = write_jsonl(tmp / "concepts.jsonl", [{"id": f"e{i:02d}", "concept": f"concept {i}", "lock": i == 1} for i in range(n)])
    cfg = {
        "workflow": {
            "name": "eli5",
            "entry": "writer",
            "python_path": [str(REPO)],
            "roles": {"writer": {"agent": f"{AGENTS}:{writer}", "params": {"next": "critc"}}, "critic": {"agent": f"{AGENTS}:Critic"}},
        },
        "dataset": {"path": str(data)},
        "llm": {"engine": "external", "base_urls": [UNUSED_URL]},
        "output": {"path": str(tmp / "out"), "flush_interval_s": 0.2},
        "run": {"max_in_flight": 2, "progress": "log", "progress_interval_s": 1.0, **run},
    }
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("matrix-hpc: ")]


def test_misspelt_next_role_stops_early_with_one_line_and_a_fixed_rerun_resumes(tmp_path: Path, run_factory: Any) -> None:
    n, out = 40, tmp_path / "out"
    job = eli5_job(tmp_path, n, stop_after_failures=5)
    run = run_factory(job)
    assert run.wait(180) == 3, run.output
    (line,) = error_lines(run.output)
    assert line.startswith("matrix-hpc: error: stopped early: the first "), line
    assert " finished tasks all failed as routing (run.stop_after_failures=5), e.g. task e" in line, line
    assert ": role 'writer' routed to unknown role 'critc' (did you mean 'critic'?); tasks in flight were stopped; " in line, line
    assert "Traceback" not in run.output
    first = store_records(out)
    assert 5 <= len(first) < n, len(first)  # the rest was never started: no LLM call paid for them
    assert {(r["status"], r["error"]["kind"], r["error"]["role"]) for r in first} == {("failed", "routing", "writer")}

    rerun = run_factory(job, "workflow.roles.writer.params.next=critic")  # fixed: the rows not done run now
    assert rerun.wait(180) == 0, rerun.output
    records = store_records(out)
    assert Counter(r["id"] for r in records) == Counter(f"e{i:02d}" for i in range(n))  # each once
    assert sum(r["status"] == "ok" for r in records) == n - len(first)


def test_forgotten_await_names_the_role_and_field_and_a_run_whose_tasks_all_fail_exits_3(tmp_path: Path, run_factory: Any) -> None:
    """Row e01 carries a lock instead (it cannot be pickled either): one line in its record,
    Ray's many-line report in agents.log."""
    out = tmp_path / "out"
    run = run_factory(eli5_job(tmp_path, 3, writer="ForgetfulWriter"))
    assert run.wait(180) == 3, run.output
    assert error_lines(run.output) == ["matrix-hpc: error: every task of this run failed (3: bad_state 3); fix the cause (the failures above say which)"], (
        run.output
    )
    assert "\x1b[" not in run.output and "Could not serialize" not in run.output, run.output  # Ray's dump stays out of the console
    errors = {r["id"]: r["error"] for r in store_records(out)}
    hint = "role 'writer' left an un-awaited coroutine (Agent.chat) in task.state['draft']: did you forget `await`? (e.g. `reply = await self.chat(task, messages)`)"
    assert errors["e00"] == {"kind": "bad_state", "message": f"task e00: {hint}", "role": "writer", "traceback": None}
    assert errors["e02"]["message"] == f"task e02: {hint}"
    lock = errors["e01"]["message"]
    assert lock.startswith("task e01 cannot be sent to role 'critic': TypeError: ") and "\n" not in lock and "\x1b[" not in lock, lock
    assert lock.endswith(f"; the full report is in {out}/logs/agents.log"), lock
    log = (out / "logs" / "agents.log").read_text()
    assert "task e00: " + hint in log and "task e01 cannot be sent to role 'critic'" in log and "Could not serialize" in log, log
    assert "failed bad_state: 3, e.g. task " in run.output


def test_a_closed_coroutine_leaves_no_never_awaited_warning() -> None:
    async def chat() -> str:
        return "hi"

    task = Task(id="e00", row={}, next_role="critic")
    task.state["turns"] = [{"draft": chat()}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        message = forgot_await(task, "writer")
        task.state.clear()
        gc.collect()
    assert message is not None and "in task.state['turns'][0]['draft']: did you forget `await`?" in message, message
    assert not [w for w in caught if "never awaited" in str(w.message)], [str(w.message) for w in caught]
    assert forgot_await(Task(id="e01", row={}, next_role=None, state={"a": [1, "x", {"b": 2.0}]}), "writer") is None
    future = asyncio.new_event_loop().create_future()
    assert "un-awaited Future" in (forgot_await(Task(id="e02", row={}, next_role=None, result={"f": future}), "critic") or "")
    assert future.cancelled()


# --- typos in params: a config error before Ray starts ------------------------------


def cli(*args: str) -> tuple[int, list[str]]:
    import subprocess

    from .conftest import BIN

    res = subprocess.run([str(BIN / "matrix-hpc"), *args], capture_output=True, text=True, timeout=120, cwd=REPO)
    return res.returncode, res.stderr.strip().splitlines()


def test_params_typos_are_config_errors_with_a_did_you_mean(tmp_path: Path) -> None:
    guide = str(REPO / "docs" / "examples" / "guide_workflow" / "config.yaml")
    collab = str(REPO / "workflows" / "collab_reasoning" / "config.yaml")
    out = f"output.path={tmp_path}/out"
    assert cli("run", guide, out, "workflow.roles.checker.params.max_trys=3") == (
        2,
        ["matrix-hpc: config error: workflow.roles.checker.params.max_trys: role 'checker' (Checker) declares no such param (did you mean 'max_tries'?)"],
    )
    assert cli("run", guide, out, "workflow.roles.checker.params.min_chars=many") == (
        2,
        ["matrix-hpc: config error: workflow.roles.checker.params.min_chars: expected int, got 'many'"],
    )
    assert cli("run", collab, out, "workflow.params.max_turn=3") == (
        2,
        ["matrix-hpc: config error: workflow.params.max_turn: no role declares this param (did you mean 'max_turns'?)"],
    )
    assert cli("run", collab, out, "workflow.roles.teacher.params.judge=referee", "workflow.roles.teacher.params.colour=red")[1] == [
        "matrix-hpc: config error: workflow.roles.teacher.params.colour: role 'teacher' (Speaker) declares no such param (its params: judge, partner, persona)"
    ]
    assert not (tmp_path / "out").exists()  # refused before anything started
