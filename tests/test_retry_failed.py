"""Failed records can be retried (issue 26): what the user did after fixing their agent code.

A run fails some rows (tests/retry_agents.py: the bug is on until a file says it is fixed);
the same command again has nothing to do and starts no engine; ``--retry-failed [KIND]``
runs the failed ones again, each new record replacing the failed one for every reader while
the store keeps both (the rule: matrix_hpc/store/latest.py). Real parts: ``matrix-hpc`` as
a subprocess, the embedded engine, real zarr stores.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from matrix_hpc.store import RecordRow, StoreReader, StoreWriter
from matrix_hpc.store.zarr_store import WriterOwner

from .conftest import BIN, REPO, actor_pids, committed_rows, store_records, wait_for, write_jsonl

AGENTS = "tests.retry_agents"
UNUSED_URL = "http://127.0.0.1:9/v1"  # nothing listens on the discard port: no LLM is called


def cli(*args: str) -> tuple[int, str]:
    res = subprocess.run([str(BIN / "matrix-hpc"), *args], capture_output=True, text=True, cwd=REPO, timeout=300)
    return res.returncode, res.stdout + res.stderr


def raw_rows(out: Path) -> list[dict[str, Any]]:
    """Every record the store holds, replaced ones included (the history)."""
    return list(StoreReader(out).iter_records(history=True))


def explain_job(tmp: Path) -> Path:
    """Six rows: two crash (agent_error) and one fails as too_short until ``tmp/fixed`` exists."""
    rows = [{"id": f"c{i}", "concept": f"concept {i}", "crash": i in (1, 4), "short": i == 2} for i in range(6)]
    cfg = {
        "workflow": {
            "name": "explain",
            "entry": "explainer",
            "metrics": f"{AGENTS}:metrics",
            "python_path": [str(REPO)],
            "roles": {"explainer": {"agent": f"{AGENTS}:Explainer", "params": {"fixed": str(tmp / "fixed")}}},
        },
        "dataset": {"path": str(write_jsonl(tmp / "concepts.jsonl", rows))},
        "llm": {"engine": "embedded", "max_tokens": 8, "embedded": {"n_parallel": 4}},
        "output": {"path": str(tmp / "out"), "flush_interval_s": 0.2},
        "run": {"max_in_flight": 6, "progress": "log", "progress_interval_s": 1.0},
    }
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def engine_logs(out: Path) -> set[str]:
    return {p.name for p in (out / "logs").glob("*.log") if p.name != "agents.log"}


def test_failed_records_are_retried_by_kind_then_all_and_replace_the_failed_ones(tmp_path: Path, run_factory: Any) -> None:
    job, out = explain_job(tmp_path), tmp_path / "out"
    first = run_factory(job)
    assert first.wait(300) == 0, first.output  # some rows failed, not all: not a failed run
    assert Counter((r["status"], (r["error"] or {}).get("kind")) for r in store_records(out)) == {
        ("ok", None): 3,
        ("failed", "agent_error"): 2,
        ("failed", "too_short"): 1,
    }
    assert f"  retry:     matrix-hpc run {job} --retry-failed  runs the 3 failed record(s) again" in first.output, first.output
    engines = engine_logs(out)
    assert engines, "the first run started an embedded engine and logged it"

    # The same command again: nothing to run, so neither Ray nor an engine starts.
    again = run_factory(job)
    assert again.wait(120) == 0, again.output
    assert (
        f"nothing to do: every row of the dataset is already in {out}; 3 of them failed (agent_error 2, too_short 1): --retry-failed runs them again"
        in again.output
    )
    assert "endpoint(s) ready" not in again.output and engine_logs(out) == engines, again.output
    assert json.loads((out / "run.json").read_text())["ray_address"] is None  # this life started no Ray cluster
    assert "this run:  0 ok, 0 failed, 6 skipped (already in the store)" in again.output

    # A typo in the kind: one config line with a "did you mean", before anything starts.
    code, text = cli("run", str(job), "--retry-failed", "too_shrt")
    assert code == 2, text
    assert (
        f"matrix-hpc: config error: run.retry_failed: no record of {out} failed as 'too_shrt' (its failures: agent_error 2, too_short 1); did you mean 'too_short'?"
        in text
    )

    code, text = cli("run", str(job), "run.retry_failed=")
    assert code == 2 and "matrix-hpc: config error: run.retry_failed: expected all, or failure kinds (agent_error,schema), got ''" in text, text

    # The user fixes the bug, then retries one kind (a key=value after the flag stays an override).
    (tmp_path / "fixed").touch()
    by_kind = run_factory(job, "--retry-failed", "agent_error", "run.progress_interval_s=2")
    assert by_kind.wait(300) == 0, by_kind.output
    assert "retrying 2 record(s) failed as agent_error: each new record replaces its failed one" in by_kind.output, by_kind.output
    assert "this run:  2 ok, 0 failed, 4 skipped" in by_kind.output, by_kind.output
    assert "store:     6 records (5 ok, 1 failed)" in by_kind.output, by_kind.output
    assert "store:     metrics seen=6, ok=5" in by_kind.output, by_kind.output  # the workflow's metrics see current records
    code, text = cli("status", str(out), "--json")
    status = json.loads(text)
    assert (status["records"], status["ok"], status["failed"], status["failed_by_kind"], status["replaced"]) == (6, 5, 1, {"too_short": 1}, 2), status
    code, text = cli("status", str(out))
    assert code == 0 and "done:      5\nfailed:    1\n  too_short: 1\nhistory:   2 failed record(s) replaced by retries" in text, text
    assert len(raw_rows(out)) == 8  # the history: both failed agent_error records are still there
    current = {r["id"]: r for r in store_records(out)}
    assert len(current) == 6 and current["c1"]["status"] == "ok" and current["c1"]["retry_of"]["error_kind"] == "agent_error"

    # Readers: export (JSONL and Parquet), show and sample see the current records only.
    code, text = cli("export", str(out), "--to", str(tmp_path / "x.jsonl"))
    assert code == 0 and "wrote 6 records" in text, text
    exported = [json.loads(line) for line in (tmp_path / "x.jsonl").read_text().splitlines()]
    assert Counter(r["id"] for r in exported) == Counter(f"c{i}" for i in range(6))
    code, text = cli("export", str(out), "--format", "parquet", "--to", str(tmp_path / "x.parquet"), "--dataset-order")
    assert code == 0 and "wrote 6 records in dataset order" in text, text
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "x.parquet")
    assert table.column("id").to_pylist() == [f"c{i}" for i in range(6)]
    assert table.column("status").to_pylist() == ["ok", "ok", "failed", "ok", "ok", "ok"]
    code, text = cli("export", str(out), "--format", "hf", "--to", str(tmp_path / "hf"))
    assert code == 0 and "wrote 6 records" in text, text
    card = yaml.safe_load((tmp_path / "hf" / "README.md").read_text().split("---\n")[1])["matrix_hpc"]
    assert card["records"] == 6 and card["by_status"] == {"ok": 5, "failed": 1}, card
    code, text = cli("show", str(out), "c1")
    assert code == 0 and "record c1: ok" in text and "history: 1 earlier record(s) of this id, failed (agent_error) and replaced by retries" in text, text
    code, text = cli("show", str(out), "c1", "--history")
    assert code == 0 and text.index("record c1: failed agent_error") < text.index("record c1: ok"), text
    code, text = cli("sample", str(out), "--status", "failed", "-n", "5")
    assert code == 0 and "record c2: failed too_short" in text and "agent_error" not in text, text

    # Then every failed record left; a re-run of that command afterwards has nothing to do.
    retry_all = run_factory(job, "--retry-failed")
    assert retry_all.wait(300) == 0, retry_all.output
    assert "retrying 1 failed record(s)" in retry_all.output and "this run:  1 ok, 0 failed, 5 skipped" in retry_all.output, retry_all.output
    assert Counter(r["status"] for r in store_records(out)) == {"ok": 6} and len(raw_rows(out)) == 9
    assert "  retry:" not in retry_all.output
    done = run_factory(job, "--retry-failed")
    assert done.wait(120) == 0, done.output
    assert f"nothing to do: every row of the dataset is already in {out}, and no failed record is left to retry" in done.output, done.output


def slow_buggy_job(tmp: Path, n: int) -> Path:
    rows = [{"id": f"t{i:02d}"} for i in range(n)]
    cfg = {
        "workflow": {
            "name": "slow",
            "entry": "worker",
            "python_path": [str(REPO)],
            "roles": {"worker": {"agent": f"{AGENTS}:SlowBuggy", "params": {"fixed": str(tmp / "fixed"), "delay_s": 0.0}}},
        },
        "dataset": {"path": str(write_jsonl(tmp / "tasks.jsonl", rows))},
        "llm": {"engine": "external", "base_urls": [UNUSED_URL]},
        "output": {"path": str(tmp / "out"), "flush_interval_s": 0.2},
        "run": {"max_in_flight": 2, "progress": "log", "progress_interval_s": 1.0, "stop_after_failures": 0},
    }
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_retry_run_killed_midway_and_resumed_leaves_one_current_record_per_id(tmp_path: Path, run_factory: Any) -> None:
    n, out = 24, tmp_path / "out"
    job = slow_buggy_job(tmp_path, n)
    first = run_factory(job)
    assert first.wait(300) == 3, first.output  # every task failed (the bug)
    assert committed_rows(out) == n
    (tmp_path / "fixed").touch()
    retry = run_factory(job, "--retry-failed", "workflow.roles.worker.params.delay_s=0.5")
    wait_for(lambda: committed_rows(out) >= n + 4, 240, "some retries committed", retry)
    retry.kill()  # SIGKILL the driver in the middle of the retry
    retry.cleanup()
    assert committed_rows(out) < 2 * n, "the kill came too late to leave retries undone"
    resumed = run_factory(job, "--retry-failed")
    assert resumed.wait(300) == 0, resumed.output
    current = store_records(out)
    assert Counter(r["id"] for r in current) == Counter(f"t{i:02d}" for i in range(n))  # one current record per id
    assert {r["status"] for r in current} == {"ok"}
    history = Counter(r["id"] for r in raw_rows(out))
    assert set(history.values()) == {2}, history  # its failed record and the one retry that replaced it, no copy
    code, text = cli("status", str(out), "--json")
    assert (json.loads(text)["records"], json.loads(text)["ok"]) == (n, n), text


def test_a_sink_killed_during_a_retry_loses_no_retry(tmp_path: Path, run_factory: Any) -> None:
    """The rows the killed sink had not committed are re-sent: a retried id does not count as
    committed because its failed record is in the store (only its new record does)."""
    import os
    import signal
    import time

    n, out = 80, tmp_path / "out"
    job = slow_buggy_job(tmp_path, n)
    assert run_factory(job).wait(300) == 3
    (tmp_path / "fixed").touch()
    retry = run_factory(
        job, "--retry-failed", "workflow.roles.worker.params.delay_s=1.0", "run.max_in_flight=8", "output.flush_interval_s=3", "run.max_attempts=10"
    )

    def sink_pid() -> int | None:
        return next(iter(actor_pids(retry, "SinkActor")), None)

    wait_for(lambda: committed_rows(out) > n and sink_pid(), 240, "the first retries committed", retry)
    time.sleep(1.5)  # where the kill lands: some retries received and not committed yet (any moment works)
    os.kill(sink_pid(), signal.SIGKILL)  # type: ignore[arg-type]
    assert retry.wait(300) == 0, retry.output[-3000:]
    assert "the sink restarted" in retry.output, retry.output[-3000:]
    current = store_records(out)
    assert Counter(r["id"] for r in current) == Counter(f"t{i:02d}" for i in range(n))
    assert Counter(r["status"] for r in current) == {"ok": n}, Counter((r["status"], (r["error"] or {}).get("kind")) for r in current)
    assert set(Counter(r["id"] for r in raw_rows(out)).values()) == {2}  # no copy of a retry


# -- the writer's rule, on a real zarr store ------------------------------------------------


def _row(rid: str, status: str, replaces: int = -1, kind: str = "agent_error") -> RecordRow:
    rec: dict[str, Any] = {"id": rid, "status": status, "error": {"kind": kind, "message": "x"} if status == "failed" else None}
    if replaces >= 0:
        rec["retry_of"] = {"row": replaces, "error_kind": kind, "records": 1}
    return RecordRow.from_record(rec)


def test_writer_accepts_one_retry_per_failed_record_and_readers_see_the_current_one(tmp_path: Path) -> None:
    w = StoreWriter(tmp_path, chunk_rows=4)
    assert w.append([_row("a", "ok"), _row("b", "failed"), _row("c", "failed")]) == []
    w.close()
    # A new life starts at row 3: b and c are failed records it may retry.
    w = StoreWriter(tmp_path, chunk_rows=4, owner=WriterOwner(start_rows=3))
    assert not w.holds("b") and w.holds("a")
    assert w.append([_row("a", "ok", replaces=0)]) == ["a"]  # a is ok: nothing to retry
    assert w.append([_row("b", "ok", replaces=1)]) == []
    assert w.append([_row("b", "ok", replaces=1)]) == ["b"]  # a copy of the retry (a re-sent task)
    assert w.append([_row("c", "failed", replaces=2)]) == []  # retried, failed again
    assert w.holds("b") and w.holds("c")
    assert w.append([_row("c", "failed", replaces=2)]) == ["c"]
    assert w.append([_row("d", "ok"), _row("b", "ok")]) == ["b"]
    w.close()
    reader = StoreReader(tmp_path)
    assert len(reader) == 4 and reader.counts()["records"] == 4 and reader.counts()["failed_by_kind"] == {"agent_error": 1}
    assert [r["id"] for r in reader.iter_records()] == ["a", "b", "c", "d"]
    assert [r["id"] for r in reader.iter_records(history=True)] == ["a", "b", "c", "b", "c", "d"]
    assert [(row, rec["status"]) for _, row, rec in reader.history("c")] == [(2, "failed"), (4, "failed")]
    # The viewer's index (and show, sample): the same rule.
    from matrix_hpc.view.index import StoreIndex
    from matrix_hpc.view.runpage import _counts

    ix = StoreIndex(tmp_path)
    ix.refresh()
    assert ix.arrays()["current"].tolist() == [True, False, False, True, True, True]
    assert ix.find_id("c") == (0, 4) and ix.find_all("b") == [(0, 1), (0, 3)]
    ix.load_numeric()
    counts = _counts(ix, ix.arrays(), True)
    assert (counts["records"], counts["ok"], counts["failed"]) == (4, 3, 1), counts
    state = reader.resume_state(frozenset())
    assert state.skip == {"a", "b", "d"} and state.retry == {"c": {"row": 4, "error_kind": "agent_error", "records": 2}}
    # A restarted writer of that life (the same start) still counts c's retry as done.
    w = StoreWriter(tmp_path, chunk_rows=4, owner=WriterOwner(start_rows=3))
    assert w.holds("b") and w.holds("c")
    assert w.append([_row("c", "ok", replaces=4)]) == []  # the next life's retry of c's current record
    w.close()
    assert StoreReader(tmp_path).counts()["ok"] == 4


@pytest.mark.parametrize("replaces", [0, 7])
def test_a_store_whose_retry_replaces_no_failed_record_of_its_id_is_refused(tmp_path: Path, replaces: int) -> None:
    """A torn or hand-edited store: a row naming a record that is not a failed one of its id."""
    w = StoreWriter(tmp_path, chunk_rows=4)
    w.append([_row("a", "ok"), _row("b", "failed")])
    w.close()
    w = StoreWriter(tmp_path, chunk_rows=4)
    w._failed["x"] = replaces  # what only a bug could do: accept a retry of no failed record
    w.append([_row("x", "ok", replaces=replaces)])
    w.close()
    from matrix_hpc.store import StoreError

    with pytest.raises(StoreError, match="replaces row"):
        StoreWriter(tmp_path, chunk_rows=4)
