"""`matrix-hpc run` end to end: real local Ray, the real embedded engine, real zarr.

Each test does what a user does (run, kill, re-run the same command) and checks
what a user would: one record per input id, reasons of failures, nothing redone.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from .conftest import BIN, committed_rows, job_config, questions, store_records, wait_for, write_jsonl

pytestmark = pytest.mark.slow


def assert_each_id_once(out: Path, expected_ids: set[str]) -> list[dict[str, Any]]:
    records = store_records(out)
    counts = Counter(r["id"] for r in records)
    assert not [i for i, n in counts.items() if n > 1], "duplicate ids in the store"
    assert set(counts) == expected_ids
    return records


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run over 12 good questions plus three bad rows."""
    tmp = tmp_path_factory.mktemp("full")
    good = questions(12)
    bad_missing = {"id": "bad-missing", "choices": ["a", "b"], "answer": "A"}
    bad_long = {"id": "bad-long", "question": "x" * 70000, "choices": ["a", "b"], "answer": "A"}
    malformed = '{"id": "bad-json", "question": "unterminated'
    data = write_jsonl(tmp / "data.jsonl", [*good[:5], malformed, *good[5:9], bad_missing, bad_long, *good[9:]])
    cfg = job_config(tmp, data)
    res = subprocess.run([str(BIN / "matrix-hpc"), "run", str(cfg)], capture_output=True, text=True, timeout=300, start_new_session=True)
    return {"tmp": tmp, "out": tmp / "out", "good": good, "res": res, "cfg": cfg}


def test_full_run_writes_one_record_per_input_id(full_run: dict[str, Any]) -> None:
    res = full_run["res"]
    assert res.returncode == 0, res.stdout + res.stderr
    records = store_records(full_run["out"])
    ids = Counter(r["id"] for r in records)
    good_ids = {q["id"] for q in full_run["good"]}
    assert len(records) == 15 and max(ids.values()) == 1
    assert good_ids | {"bad-missing", "bad-long"} <= set(ids)
    for rec in records:
        if rec["id"] in good_ids:
            assert rec["status"] == "ok", rec["error"]
            assert rec["result"]["turns"] >= 1 and rec["turns"][0]["role"] == "teacher"
            assert rec["turns"][0]["completion_tokens"] > 0 and rec["usage"]["prompt_tokens"] > 0
    assert "run finished" in res.stdout and f"output: {full_run['out']}" in res.stdout
    assert "agreement_rate=" in res.stdout


def test_bad_input_rows_are_failed_records_with_reasons(full_run: dict[str, Any]) -> None:
    failed = {r["id"]: r for r in store_records(full_run["out"]) if r["status"] == "failed"}
    assert len(failed) == 3
    assert failed["bad-missing"]["error"]["message"] == "line 11: row bad-missing is missing required field 'question'"
    assert "over dataset.max_row_bytes=65536" in failed["bad-long"]["error"]["message"]
    (json_id,) = set(failed) - {"bad-missing", "bad-long"}
    assert failed[json_id]["error"]["message"].startswith("line 6: invalid JSON")
    assert all(r["error"]["kind"] == "bad_input" for r in failed.values())


def test_status_and_export_commands(full_run: dict[str, Any]) -> None:
    out, tmp = full_run["out"], full_run["tmp"]
    st = subprocess.run([str(BIN / "matrix-hpc"), "status", str(out)], capture_output=True, text=True, timeout=60)
    assert st.returncode == 0, st.stderr
    assert "done:      12" in st.stdout and "failed:    3" in st.stdout and "bad_input: 3" in st.stdout and "remaining: 0" in st.stdout
    js = json.loads(subprocess.run([str(BIN / "matrix-hpc"), "status", str(out), "--json"], capture_output=True, text=True, timeout=60).stdout)
    assert (js["ok"], js["failed"], js["input_rows"], js["writer_active"]) == (12, 3, 15, False)
    ex = subprocess.run([str(BIN / "matrix-hpc"), "export", str(out), "--to", str(tmp / "x.jsonl")], capture_output=True, text=True, timeout=60)
    assert ex.returncode == 0 and "wrote 15 records" in ex.stdout
    assert len((tmp / "x.jsonl").read_text().splitlines()) == 15
    ex = subprocess.run(
        [str(BIN / "matrix-hpc"), "export", str(out), "--format", "parquet", "--status", "ok", "--to", str(tmp / "x.parquet")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ex.returncode == 0 and "wrote 12 records" in ex.stdout


def test_rerun_of_finished_job_does_nothing(full_run: dict[str, Any]) -> None:
    before = {r["id"]: r["finished_at"] for r in store_records(full_run["out"])}
    engines = sorted((full_run["out"] / "logs").glob("embedded-engine-*.log"))
    res = subprocess.run([str(BIN / "matrix-hpc"), "run", str(full_run["cfg"])], capture_output=True, text=True, timeout=300, start_new_session=True)
    assert res.returncode == 0, res.stderr
    assert "0 ok, 0 failed, 15 skipped" in res.stdout
    # Known finished before anything starts: no Ray, no engine (it used to take ~40 s to do nothing).
    assert f"nothing to do: every row of the dataset is already in {full_run['out']}" in res.stderr, res.stderr
    assert sorted((full_run["out"] / "logs").glob("embedded-engine-*.log")) == engines
    assert {r["id"]: r["finished_at"] for r in store_records(full_run["out"])} == before


def test_resume_after_driver_sigkill(tmp_path: Path, run_factory: Any) -> None:
    rows = questions(32)
    cfg = job_config(tmp_path, write_jsonl(tmp_path / "data.jsonl", rows), **{"run.max_in_flight": 8})
    out = tmp_path / "out"
    kill_after = random.Random().randint(4, 16)  # a random point, printed on failure
    run = run_factory(cfg)
    wait_for(lambda: committed_rows(out) >= kill_after, 240, f"{kill_after} committed rows", run)
    run.kill()
    run.cleanup()
    first = {r["id"]: r for r in store_records(out)}
    assert len(first) >= kill_after, f"kill_after={kill_after}"

    # Re-run at once: the dead driver's sink actor may still be alive for a moment,
    # committing what it held; the new run waits for it instead of clashing.
    rerun = run_factory(cfg)
    assert rerun.wait(540) == 0, rerun.output
    skipped = int(re.search(r"(\d+) skipped", rerun.output).group(1))
    assert skipped >= len(first), rerun.output
    records = assert_each_id_once(out, {q["id"] for q in rows})
    # Finished work is not redone: the first run's records are untouched.
    for rec in records:
        if rec["id"] in first:
            assert rec["finished_at"] == first[rec["id"]]["finished_at"]
    assert all(r["status"] == "ok" for r in records), [r["error"] for r in records if r["error"]]


def test_killed_agent_actor_is_restarted_and_its_tasks_resent(tmp_path: Path, run_factory: Any) -> None:
    rows = questions(24)
    cfg = job_config(tmp_path, write_jsonl(tmp_path / "data.jsonl", rows))
    out = tmp_path / "out"
    run = run_factory(cfg)
    wait_for(lambda: committed_rows(out) >= 4 and "actors" in json.loads((out / "run.json").read_text()), 240, "first commits", run)
    # A second run on the same output is refused while the first one writes.
    clash = subprocess.run([str(BIN / "matrix-hpc"), "run", str(cfg)], capture_output=True, text=True, timeout=120)
    assert clash.returncode == 1 and "is being written by another run" in clash.stderr

    actors = json.loads((out / "run.json").read_text())["actors"]
    (teacher,) = [pid for name, pid in actors.items() if name.endswith("/teacher/0")]
    os.kill(teacher, signal.SIGKILL)
    assert run.wait(540) == 0, run.output
    assert "re-sent" in run.output, run.output
    records = assert_each_id_once(out, {q["id"] for q in rows})
    assert all(r["status"] == "ok" for r in records), [r["error"] for r in records if r["error"]]
    assert max(r["attempt"] for r in records) == 2

    again = run_factory(cfg)
    assert again.wait(540) == 0
    assert "0 ok, 0 failed, 24 skipped" in again.output
    assert_each_id_once(out, {q["id"] for q in rows})


def test_killed_engine_is_restarted_and_no_task_is_lost(tmp_path: Path, run_factory: Any) -> None:
    rows = questions(24)
    cfg = job_config(
        tmp_path,
        write_jsonl(tmp_path / "data.jsonl", rows),
        **{"llm.max_retries": 2, "llm.retry_backoff_s": 0.2, "llm.timeout_s": 30.0, "llm.health_interval_s": 0.5},
    )
    out = tmp_path / "out"
    run = run_factory(cfg)
    wait_for(lambda: committed_rows(out) >= 3 and json.loads((out / "run.json").read_text()).get("llm"), 240, "first commits", run)
    (before,) = json.loads((out / "run.json").read_text())["llm"]
    os.kill(before["pid"], signal.SIGKILL)
    assert run.wait(240) == 0, run.output
    records = assert_each_id_once(out, {q["id"] for q in rows})
    for rec in records:  # whatever was in flight at the kill either got through on retry or says why not
        if rec["status"] == "failed":
            assert rec["error"]["kind"] == "llm_unavailable", rec["error"]
            msg = rec["error"]["message"]
            assert (before["url"] in msg and "after 3 attempts" in msg) or "no healthy endpoint (all down, unreachable or restarting)" in msg, msg
    (after,) = json.loads((out / "run.json").read_text())["llm"]
    assert after["restarts"] == 1 and after["state"] == "up" and after["pid"] != before["pid"], after
    assert after["url"] == before["url"]  # same port again: sticky routes stay valid
    assert "was restarted 1 time(s)" in run.output
    late = [t for r in records for t in r["turns"] if t["endpoint"] and t["started_at"] > after["restarted_at"]]
    assert late, "no LLM call after the restart: the run did not use the new engine"


def test_sigterm_saves_finished_work_and_rerun_completes(tmp_path: Path, run_factory: Any) -> None:
    rows = questions(24)
    cfg = job_config(tmp_path, write_jsonl(tmp_path / "data.jsonl", rows), **{"run.max_in_flight": 8})
    out = tmp_path / "out"
    run = run_factory(cfg)
    wait_for(lambda: committed_rows(out) >= 4, 240, "first commits", run)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(120) == 130, run.output
    assert "stopping intake" in run.output and "INTERRUPTED" in run.output
    first = {r["id"]: r["finished_at"] for r in store_records(out)}
    assert 4 <= len(first) < 24
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"

    rerun = run_factory(cfg)
    assert rerun.wait(540) == 0, rerun.output
    assert f"{len(first)} skipped" in rerun.output
    records = assert_each_id_once(out, {q["id"] for q in rows})
    assert all(r["finished_at"] == first[r["id"]] for r in records if r["id"] in first)
