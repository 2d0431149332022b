"""A new user's first hour (issue 15): the usual mistakes, each answered by one line.

Each test does what the user did: runs ``matrix-hpc`` as a subprocess and checks its
exit status and the exact line it printed (these all fail before Ray starts: fast).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from matrix_hpc.store import StoreReader

from .conftest import BIN, REPO, committed_rows, store_records, wait_for, write_jsonl

CONFIG = REPO / "workflows" / "collab_reasoning" / "config.yaml"
ROOT = os.geteuid() == 0 and shutil.which("unshare") is not None


def cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "matrix-hpc"), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def one_line(res: subprocess.CompletedProcess[str]) -> str:
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


# --- output.path ------------------------------------------------------------


def test_output_under_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "notes").write_text("a file, not a folder")
    res = cli("run", str(CONFIG), f"output.path={tmp_path}/notes/out")
    assert res.returncode == 2
    assert one_line(res) == f"matrix-hpc: error: output.path: {tmp_path}/notes/out is under {tmp_path}/notes, which is a file, not a folder"
    res = cli("run", str(CONFIG), f"output.path={tmp_path}/notes")
    assert res.returncode == 2
    assert one_line(res) == f"matrix-hpc: error: output.path: {tmp_path}/notes is a file, not a folder"


@pytest.mark.parametrize("command", ["run", "serve"])
def test_output_that_cannot_be_created(command: str) -> None:
    res = cli(command, str(CONFIG), "output.path=/proc/out")
    assert res.returncode == 2
    assert one_line(res) == "matrix-hpc: error: output.path: cannot create /proc/out: no such file or directory"


def _in_private_mount(tmp_path: Path, script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` (sh) with a private tmpfs on $RO, in its own mount namespace."""
    ro = tmp_path / "ro"
    ro.mkdir()
    env = {**os.environ, "RO": str(ro), "MHPC": str(BIN / "matrix-hpc"), "PY": sys.executable, "CONFIG": str(CONFIG)}
    full = 'set -e; mount -t tmpfs -o size=8m tmpfs "$RO"; ' + script
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", full], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.skipif(not ROOT, reason="needs root and unshare (private mount namespace)")
def test_output_on_a_read_only_filesystem(tmp_path: Path) -> None:
    res = _in_private_mount(tmp_path, 'mount -o remount,ro "$RO"; "$MHPC" run "$CONFIG" output.path="$RO/out" || echo "rc=$?"')
    assert res.stdout.strip() == "rc=2", res.stderr
    assert one_line(res) == f"matrix-hpc: error: output.path: cannot create {tmp_path}/ro/out: read-only file system"


@pytest.mark.skipif(not ROOT, reason="needs root and unshare (private mount namespace)")
def test_resume_on_a_read_only_filesystem(tmp_path: Path) -> None:
    """A store made by an earlier run, later found on a read-only mount: refused before anything starts."""
    make_store = '"$PY" -c "import sys; from matrix_hpc.store import StoreWriter; StoreWriter(sys.argv[1]).close()" "$RO/out"; '
    res = _in_private_mount(tmp_path, make_store + 'mount -o remount,ro "$RO"; "$MHPC" run "$CONFIG" output.path="$RO/out" || echo "rc=$?"')
    assert res.stdout.strip() == "rc=2", res.stderr
    assert one_line(res) == f"matrix-hpc: error: output.path: cannot write to {tmp_path}/ro/out: read-only file system"


# --- one rule for relative paths ---------------------------------------------


def test_relative_paths_follow_where_they_were_written(tmp_path: Path) -> None:
    """In the config file: from the file's folder; as key=value: from the current folder."""
    cfg_dir, cwd = tmp_path / "configs", tmp_path / "work"
    cfg_dir.mkdir()
    cwd.mkdir()
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["dataset"]["path"] = "data/rows.jsonl"
    cfg["output"]["path"] = "blocked/out"
    (cfg_dir / "job.yaml").write_text(yaml.safe_dump(cfg))
    (cfg_dir / "blocked").write_text("")  # a file where the output folder's parent should be
    (cwd / "blocked").write_text("")

    res = cli("run", str(cfg_dir / "job.yaml"), cwd=cwd)  # from the file: next to the file
    assert res.returncode == 2
    assert one_line(res) == f"matrix-hpc: error: output.path: {cfg_dir}/blocked/out is under {cfg_dir}/blocked, which is a file, not a folder"
    res = cli("run", str(cfg_dir / "job.yaml"), "output.path=blocked/out", cwd=cwd)  # from the command line: here
    assert res.returncode == 2
    assert one_line(res) == f"matrix-hpc: error: output.path: {cwd}/blocked/out is under {cwd}/blocked, which is a file, not a folder"
    res = cli("run", str(cfg_dir / "job.yaml"), "output.path=out", cwd=cwd)
    assert res.returncode == 1
    assert one_line(res) == f"matrix-hpc: error: dataset.path: no such file {cfg_dir}/data/rows.jsonl"
    res = cli("run", str(cfg_dir / "job.yaml"), "output.path=out", "dataset.path=rows.jsonl", cwd=cwd)
    assert one_line(res) == f"matrix-hpc: error: dataset.path: no such file {cwd}/rows.jsonl"


# --- settings that were silently ignored -----------------------------------


def test_base_urls_with_a_managed_engine_is_refused() -> None:
    res = cli("run", str(CONFIG), "llm.base_urls=[http://127.0.0.1:9/v1]")
    assert res.returncode == 2
    assert one_line(res) == (
        "matrix-hpc: config error: llm.base_urls: only used with llm.engine: external (this model's engine is 'embedded'); remove it or set llm.engine=external"
    )


def test_id_field_that_no_row_has(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "rows.jsonl", [{"uid": f"u{i}", "text": "q: a"} for i in range(5)])
    res = cli("run", str(CONFIG), f"dataset.path={data}", f"output.path={tmp_path}/out")
    assert res.returncode == 1
    assert one_line(res) == (
        f"matrix-hpc: error: dataset.id_field: no row of {data} has a field 'id' "
        "(name the field that holds each row's id, or set dataset.id_field=null to hash every row)"
    )


# --- a real run of the user's own workflow (no LLM: fast) ----------------------


def user_job(tmp: Path, n: int = 60, sleep_s: float = 0.3) -> Path:
    """The user's workflow: one role with a bug on every fifth row, three rows without an id."""
    rows = [{"id": f"r{i:02d}", "text": f"q{i}: a{i}" if i % 5 else f"broken {i}"} for i in range(n)]
    for row in rows[1:4]:
        del row["id"]
    data = write_jsonl(tmp / "rows.jsonl", rows)
    cfg = {
        # The agent module lives in this repo's tests/ package: the repo is on the workflow's import path.
        "workflow": {
            "name": "mine",
            "entry": "answer",
            "metrics": "tests.first_hour_agents:metrics",
            "python_path": [str(REPO)],
            "roles": {"answer": {"agent": "tests.first_hour_agents:Answerer", "params": {"sleep_s": sleep_s}}},
        },
        "dataset": {"path": str(data)},
        "llm": {"engine": "external", "base_urls": [UNUSED_URL]},
        "output": {"path": str(tmp / "out"), "flush_interval_s": 0.2},
        "run": {"max_in_flight": 10, "progress": "log", "progress_interval_s": 1.0, "stop_grace_s": 30},
    }
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


UNUSED_URL = "http://127.0.0.1:9/v1"  # nothing listens on the discard port
AGENTS = REPO / "tests" / "first_hour_agents.py"
BUG_LINE = next(i for i, line in enumerate(AGENTS.read_text().splitlines(), 1) if 'text.split(":")[1]' in line)


def status(out: Path) -> str:
    res = cli("status", str(out))
    assert res.returncode == 0, res.stderr
    return res.stdout


def summary_lines(output: str) -> list[str]:
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("run "))
    end = next(i for i, line in enumerate(lines) if line.startswith("output: "))
    return lines[start + 1 : end]


def test_interrupt_resume_and_what_the_user_reads(tmp_path: Path, run_factory: Any) -> None:
    job = user_job(tmp_path)
    out = tmp_path / "out"
    run = run_factory(job)
    wait_for(lambda: committed_rows(out) >= 5, 120, "first commits", run)
    os.killpg(run.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
    assert run.wait(120) == 130, run.output
    text = run.output
    assert "\x1b[" not in text  # not a terminal: no colour codes, from us or from Ray
    notices = [line for line in text.splitlines() if "stopping intake" in line]
    assert notices == ["SIGINT: stopping intake; tasks in flight get up to 30s, finished work is saved (again to abort)"], text
    assert f"warning: model default: LLM endpoint {UNUSED_URL} is not answering (" in text and "endpoint(s) ready in" not in text
    assert "warning: dataset.id_field: 3 of 60 rows have no field 'id'; they get content-hash ids" in text.splitlines()
    assert all(line.startswith(("  this run:  ", "  store:     ", "  log:       ")) for line in summary_lines(text)), text
    first = committed_rows(out)
    st = status(out)
    assert "(interrupted (re-run to resume))" in st and "running" not in st, st
    assert f"llm:       model default: {UNUSED_URL} (at the end of the run: down, 0 restarts)" in st.splitlines(), st

    run = run_factory(job, "workflow.roles.answer.params.sleep_s=0")
    assert run.wait(120) == 0, run.output
    lines = summary_lines(run.output)
    ok_line = next(line for line in lines if line.startswith("  this run:  ") and " ok, " in line)
    assert ok_line.endswith(f"{first} skipped (already in the store)"), lines
    assert "  store:     60 records (48 ok, 12 failed), 0 prompt + 0 completion tokens" in lines, lines
    # The workflow's metrics are over the whole store too (they were over the last life's records).
    assert "  store:     metrics answered=48, broken=12" in lines, lines
    assert json.loads((out / "run.json").read_text())["metrics"] == {"answered": 48, "broken": 12}
    # The run's time is the clock's, start-up and shut-down included, and its phases add up.
    took = re.search(r"^run finished in ([\d.]+)s: start-up ([\d.]+)s, running tasks ([\d.]+)s, shut-down ([\d.]+)s$", run.output, re.M)
    assert took and float(took[2]) > 0 and abs(float(took[1]) - sum(float(took[i]) for i in (2, 3, 4))) <= 0.25, run.output[-2000:]
    sample = next(line for line in lines if "failed agent_error" in line)
    assert sample.endswith(f", e.g. IndexError: list index out of range (role answer) at {AGENTS}:{BUG_LINE} in parse_answer"), sample
    assert f"  log:       agent tracebacks in {out}/logs/agents.log" in lines
    log_text = (out / "logs" / "agents.log").read_text()
    assert "IndexError: list index out of range" in log_text and "in parse_answer" in log_text
    failed = [r for r in store_records(out) if r["status"] == "failed"]
    assert len(failed) == 12 and all(r["error"]["kind"] == "agent_error" for r in failed)
    assert failed[0]["error"]["traceback"][-1] == f'{AGENTS}:{BUG_LINE} in parse_answer: return text.split(":")[1].strip()'
    assert "(finished)" in status(out)


def test_ray_warnings_have_no_colour_codes_off_a_terminal(tmp_path: Path, run_factory: Any) -> None:
    """An agent process dies (segfault, OOM kill): Ray's "(raylet)" notice reaches the log plain."""
    run = run_factory(user_job(tmp_path, n=10, sleep_s=0), f"workflow.roles.answer.params.crash_marker={tmp_path}/crashed")
    assert run.wait(180) == 0, run.output
    assert "(raylet) A worker died or was killed" in run.output and "\x1b[" not in run.output, run.output


def test_second_ctrl_c_aborts_and_status_says_so(tmp_path: Path, run_factory: Any) -> None:
    out = tmp_path / "out"
    run = run_factory(user_job(tmp_path, sleep_s=5.0))
    wait_for(lambda: "done 0/60 | failed 0 | in flight 10" in run.output, 120, "tasks in flight", run)
    os.killpg(run.proc.pid, signal.SIGINT)
    wait_for(lambda: "stopping intake" in run.output, 30, "the notice", run)
    os.killpg(run.proc.pid, signal.SIGINT)
    assert run.wait(120) == 130, run.output
    assert "matrix-hpc: aborted; committed work is kept, re-run to resume" in run.output and "Traceback" not in run.output
    st = status(out)
    assert "(aborted (re-run to resume))" in st and "llm:" not in st, st


def test_killed_driver_is_not_reported_running(tmp_path: Path, run_factory: Any) -> None:
    out = tmp_path / "out"
    run = run_factory(user_job(tmp_path, sleep_s=5.0))
    wait_for(lambda: "done 0/60 | failed 0 | in flight 10" in run.output, 120, "tasks in flight", run)
    run.kill()  # SIGKILL to the driver only
    st = status(out)
    assert "crashed" in st and "running" not in st and "llm:" not in st, st
    run.cleanup()  # everything it started is gone too: the writer lock is free
    wait_for(lambda: not StoreReader(out).writer_active(), 60, "the writer lock to be free")
    assert "(crashed (writer gone))" in status(out)


# --- records that are easy to read --------------------------------------------


def _store(path: Path, results: list[Any]) -> None:
    """A store as a run leaves it: turns, usage, a failed record with a traceback."""
    from matrix_hpc.runtime.task import Task, Turn
    from matrix_hpc.store import RecordRow, StoreWriter

    rows = []
    for i, result in enumerate(results):
        t = Task(id=f"t{i:05d}", row={"id": f"t{i:05d}", "question": f"q{i}", "choices": ["a", "b"]}, next_role=None)
        t.turns.append(Turn(role="teacher", text=f"The answer is (A) {i}", prompt_tokens=10, completion_tokens=3, endpoint="http://127.0.0.1:1/v1", model="m"))
        if i % 10 == 3:
            t.fail("agent_error", "IndexError: list index out of range", "judge", traceback=["agents.py:12 in parse: x[1]"])
        else:
            t.finish(result)
        rows.append(RecordRow.from_record(t.to_record()))
    w = StoreWriter(path, chunk_rows=1024)
    w.append(rows)
    w.close()


def test_parquet_export_has_nested_columns_and_real_nulls(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 5000
    _store(tmp_path / "out", [{"agreed": bool(i % 2), "answers": {"teacher": ["A"]}, "turns": 2} for i in range(n)])
    res = cli("export", str(tmp_path / "out"), "--format", "parquet", "--to", str(tmp_path / "x.parquet"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [f"wrote {n} records to {tmp_path}/x.parquet"]
    f = pq.ParquetFile(tmp_path / "x.parquet")
    assert f.metadata.num_row_groups == 3  # streamed in groups of 2048, not built whole in memory
    schema = f.schema_arrow
    assert pa.types.is_struct(schema.field("row").type) and pa.types.is_struct(schema.field("result").type)
    assert pa.types.is_list(schema.field("turns").type) and pa.types.is_struct(schema.field("turns").type.value_type)
    assert pa.types.is_struct(schema.field("usage").type) and pa.types.is_struct(schema.field("error").type)
    table = f.read().to_pylist()
    ok, failed = table[0], table[3]
    assert ok["error"] is None and ok["error_kind"] is None  # real nulls, not the text "null"
    assert ok["row"]["choices"] == ["a", "b"] and ok["result"]["answers"] == {"teacher": ["A"]}
    assert ok["turns"][0]["text"] == "The answer is (A) 0" and ok["usage"]["prompt_tokens"] == 10
    assert failed["result"] is None and failed["error"]["traceback"] == ["agents.py:12 in parse: x[1]"]


def test_parquet_export_falls_back_per_column(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    _store(tmp_path / "out", [{"score": 4}, {"score": "high"}, {"score": [1, 2]}, {"score": 1}])
    res = cli("export", str(tmp_path / "out"), "--format", "parquet", "--to", str(tmp_path / "x.parquet"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        f"wrote 4 records to {tmp_path}/x.parquet",
        "note: column(s) result written as JSON text: their values do not fit one Parquet type",
    ]
    table = pq.read_table(tmp_path / "x.parquet")
    assert table.schema.field("result").type == pa.string() and pa.types.is_struct(table.schema.field("row").type)
    assert table.column("result").to_pylist() == ['{"score": 4}', '{"score": "high"}', '{"score": [1, 2]}', None]  # the failed one: a real null


# --- check-health names the model ----------------------------------------------


def test_check_health_refuses_a_model_the_server_does_not_serve(tmp_path: Path) -> None:
    from matrix_hpc.services.llm import EmbeddedEngine

    with EmbeddedEngine(n_parallel=2, log_dir=tmp_path, served_model_name="smol") as engine:
        engine.wait_ready(60)
        url = engine.base_url
        res = cli("check-health", "--url", url, "--model", "gpt-4o", "--timeout", "30")
        assert res.returncode == 1, res.stdout
        line = res.stdout.splitlines()[0]
        assert line.startswith(f"FAIL  {url}  (") and line.endswith("s, model gpt-4o; model gpt-4o is not served here (it serves: smol))"), line
        res = cli("check-health", "--url", url, "--model", "smol", "--timeout", "30")
        assert res.returncode == 0 and res.stdout.splitlines()[-1] == "1/1 endpoints generate", res.stdout
