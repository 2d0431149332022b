"""Runtime robustness (issue 20): a lost or frozen process never stalls a run, never
turns good tasks into failures, and never makes a batch run twice.

Each test runs the real ``matrix-hpc run`` on real Ray and real zarr with the small
agents of ``tests/robustness_agents.py``, and brings the fault on for real: SIGKILL,
SIGSTOP, SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from .conftest import REPO, committed_rows, store_records, wait_for, write_config, write_jsonl
from .test_reliability import actor_pid, each_id_once

pytestmark = pytest.mark.slow

AGENTS = "tests.robustness_agents"


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver and Ray's workers import the test agents from the repository."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))


def relay_config(tmp: Path, n: int, roles: dict[str, Any], entry: str = "a", **overrides: Any) -> Path:
    """A job over ``n`` rows ``t0..t{n-1}`` with the given roles (an LLM only where overrides name one)."""
    data = write_jsonl(tmp / "data.jsonl", [{"id": f"t{i}", "x": i} for i in range(n)])
    cfg: dict[str, Any] = {
        "workflow": {"name": "robust", "entry": entry, "roles": roles},
        "dataset": {"path": str(data)},
        "llm": {"engine": "external", "base_urls": ["http://127.0.0.1:9/v1"]},  # never called unless overridden
        "output": {"path": str(tmp / "out"), "flush_interval_s": 0.2, "chunk_rows": 64},
        "run": {"max_in_flight": 64, "progress": "log", "progress_interval_s": 1.0, "health_interval_s": 0.5, "batch_size": 16},
    }
    return write_config(tmp, cfg, overrides)


def started(out: Path, rows: int) -> bool:
    """The run has committed ``rows`` and written its actors' pids."""
    try:
        return committed_rows(out) >= rows and "actors" in json.loads((out / "run.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False


# --- item 5: a restarted actor whose setup() fails -----------------------------------


def test_restarted_actor_whose_setup_fails_leaves_routing_and_its_peers_finish(tmp_path: Path, run_factory: Any) -> None:
    """a/1 is SIGKILLed; Ray restarts it and its setup() fails there. It must leave
    routing (as an actor gone for good) so a/0 finishes its tasks: every record ok.
    Before the fix every task routed to the restarted a/1 was committed as agent_error."""
    n, count = 300, tmp_path / "setups"
    roles = {"a": {"agent": f"{AGENTS}:SetupFailsAfter", "instances": 2, "concurrency": 4, "params": {"count": str(count), "ok_setups": 2, "sleep_s": 0.3}}}
    out = tmp_path / "out"
    run = run_factory(relay_config(tmp_path, n, roles, **{"run.max_attempts": 6}))
    wait_for(lambda: started(out, 16), 120, "first commits", run)
    assert committed_rows(out) <= n - 100, "the run was nearly over before the kill: nothing left to route to a/1"
    os.kill(actor_pid(out, "/a/1"), signal.SIGKILL)
    assert run.wait(240) == 0, run.output
    assert "a/1 leaves routing: workflow.roles.a: setup() failed: RuntimeError: cannot open the resource (setup #3) after a restart" in run.output, run.output
    assert "is gone for good" in run.output, run.output
    records = each_id_once(out, n)
    assert all(r["status"] == "ok" for r in records), Counter((r["error"] or {}).get("kind") for r in records)
    assert count.read_text().count("setup") == 3  # two at the start, one by the restarted a/1


# --- item 9: one re-send path, so a batch is never executed twice --------------------


@pytest.fixture
def counting_llm() -> Any:
    from .counting_llm import CountingLLM

    server = CountingLLM(delay_s=(0.3, 0.5)).start()  # slow enough that b/0 always has calls open
    try:
        yield server
    finally:
        server.stop()


def test_a_delivery_unanswered_for_long_is_not_executed_twice(tmp_path: Path, run_factory: Any, counting_llm: Any) -> None:
    """b/0 is frozen (SIGSTOP, as a long GC pause or a wedged host would) for longer than
    the outbox used to wait before re-sending a delivery (30 s), then thawed. Ray delivers
    the original call once b/0 answers again; a second copy must not be sent as well: each
    task's one LLM call is made exactly once. Before the fix the outbox re-sent every batch
    unanswered for 30 s, and b/0 then ran the originals too (the store refused the copies,
    but the LLM calls were paid twice)."""
    n = 160
    roles = {
        "a": {"agent": f"{AGENTS}:Relay", "params": {"next": "b"}},
        "b": {"agent": f"{AGENTS}:OneCall", "instances": 2, "model": "default", "sampling": {"max_tokens": 8}},
    }
    out = tmp_path / "out"
    cfg = relay_config(tmp_path, n, roles, **{"llm.base_urls": [counting_llm.url], "run.replay": False, "run.max_in_flight": 32})
    run = run_factory(cfg)
    wait_for(lambda: started(out, 8), 120, "first commits", run)
    b0 = actor_pid(out, "/b/0")
    os.kill(b0, signal.SIGSTOP)
    try:
        frozen_at = committed_rows(out)
        # Deliveries to b/0 pile up unanswered (b/1 finishes its share, then the window is full).
        time.sleep(40)  # past the outbox's old 30 s re-send (not a timing assertion: the count is)
        assert committed_rows(out) < n, f"the run finished while b/0 was frozen (from {frozen_at} rows): b/0 held nothing"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(b0, signal.SIGCONT)
    assert run.wait(180) == 0, run.output
    records = each_id_once(out, n)
    assert all(r["status"] == "ok" for r in records), Counter((r["error"] or {}).get("kind") for r in records)
    assert counting_llm.received == n, f"{counting_llm.received} LLM calls for {n} tasks of one call each"


# --- item 7: the driver never blocks on another process ------------------------------


def test_a_frozen_entry_actor_does_not_freeze_the_driver(tmp_path: Path, run_factory: Any) -> None:
    """The entry actor a/0 is frozen (SIGSTOP: as one Ray cannot place while it restarts)
    while b still finishes what it holds, so room opens and the driver sends a/0 new tasks
    that it never accepts. The driver's loop must go on: its progress lines keep coming,
    the stall check reports who holds the tasks (a/0 named as not answering), and a SIGTERM
    stops the run with the finished work committed. Before the fix the driver awaited that
    dispatch forever: no progress line, no stall report (the stall test in test_reliability
    covers the stop that follows a report)."""
    n = 400
    roles = {
        "a": {"agent": f"{AGENTS}:Relay", "concurrency": 4, "params": {"next": "b"}},
        "b": {"agent": "tests.fault_agents:Slow", "concurrency": 32, "params": {"sleep_s": 0.5}},
    }
    out = tmp_path / "out"
    # stall_timeout_s 15: the TERM lands long before the report's second stage (a stop) could,
    # also on a busy machine (the stop comes a stall timeout after the report).
    run = run_factory(relay_config(tmp_path, n, roles, **{"run.max_in_flight": 32, "run.batch_size": 4, "run.stall_timeout_s": 15.0, "run.stop_grace_s": 1.0}))
    wait_for(lambda: started(out, 16), 120, "first commits", run)
    a0 = actor_pid(out, "/a/0")
    os.kill(a0, signal.SIGSTOP)
    try:
        before = committed_rows(out)
        lines = run.output.count("] done ")  # a progress line each second the loop comes round
        # b finishes what it holds, so room opens for tasks the driver sends a/0. On a busy
        # machine b may have finished all of it before the freeze (a CI run: 32 of 32): the
        # room is open already, and the stall report says the driver holds them for a/0.
        wait_for(lambda: committed_rows(out) > before or "held by driver (sending to a/0)" in run.output, 60, "room for tasks a/0 cannot take", run)
        wait_for(lambda: run.output.count("] done ") >= lines + 3, 60, "the driver's loop to come round", run)
        wait_for(lambda: "not answering: a/0" in run.output, 120, "the stall report", run)
        assert "held by driver (sending to a/0)" in run.output, run.output
        run.proc.send_signal(signal.SIGTERM)
        code = run.wait(150)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(a0, signal.SIGCONT)
    assert code == 130 and "INTERRUPTED" in run.output, run.output
    records = store_records(out)
    assert len({r["id"] for r in records}) == len(records) >= before  # what was committed stays, once
    assert all(r["status"] == "ok" for r in records)


# --- item 8: on TERM the final commit comes before slow clean-up ---------------------


def test_term_commits_finished_work_before_the_agents_slow_close(tmp_path: Path, run_factory: Any) -> None:
    """20 tasks finish and wait in the sink (commits only every 10 minutes here); 20 more
    hang. On TERM the sink must commit them before the agents' close(), which is slow: the
    test SIGKILLs the whole run as close() starts (Slurm's KILL after KillWait), and every
    finished task is in the store. Before the fix the final commit came after close()."""
    n, done = 40, 20
    finished, closing = tmp_path / "finished", tmp_path / "closing"
    roles = {"a": {"agent": f"{AGENTS}:FinishOrHang", "params": {"finish_below": done, "finished": str(finished), "closing": str(closing)}}}
    out = tmp_path / "out"
    cfg = relay_config(tmp_path, n, roles, **{"output.flush_interval_s": 600.0, "output.chunk_rows": 1024, "run.stop_grace_s": 0.5})
    run = run_factory(cfg)
    # Every finished task is at the sink (in flight counts those it has not received), none committed.
    wait_for(lambda: f"done 0/{n} | failed 0 | in flight {n - done} |" in run.output, 120, "the finished tasks at the sink", run)
    assert committed_rows(out) == 0
    run.proc.send_signal(signal.SIGTERM)
    wait_for(closing.exists, 120, "the agents' close()", run)
    run.cleanup()  # SIGKILL to the run's whole process group: nothing after this point happens
    ids = set(finished.read_text().split())
    assert len(ids) == done
    assert {r["id"] for r in store_records(out)} == ids, "finished tasks lost on TERM"
