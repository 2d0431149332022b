"""Looking at the data from the terminal (issue 26): ``matrix-hpc show``, ``sample``, the
export options, a closed pipe, and the lines that end a run.

One real run (collab reasoning on the embedded engine, a row whose agent raises and a row
the source rejects) is shared by the module; every command runs as a subprocess, as the
user types it, and what it prints is checked against the store.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest

from matrix_hpc.store import StoreReader

from .conftest import BIN, REPO, Run, questions, write_jsonl
from .view_agents import gated_collab_job

pytestmark = pytest.mark.slow

GOOD = 16


@pytest.fixture(scope="module")
def done_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A finished run: GOOD questions, a row whose agent raises (agent_error, with its
    traceback) and a row without choices (bad_input, from the source), in the middle."""
    tmp = tmp_path_factory.mktemp("terminal-views")
    qs = questions(GOOD)
    rows = [*qs[:6], {**qs[0], "id": "boom1", "boom": True}, *qs[6:11], {"id": "no-choices", "question": "y?"}, *qs[11:]]
    dataset = write_jsonl(tmp / "rows.jsonl", rows)
    run = Run(gated_collab_job(tmp, dataset), log=tmp / "run.log")
    assert run.wait(300) == 0, run.output
    out = tmp / "out"
    return {"tmp": tmp, "out": out, "log": run.output, "rows": rows, "records": list(StoreReader(out).iter_records())}


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "matrix-hpc"), *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def shown_ids(stdout: str) -> list[str]:
    """The ids ``sample`` printed, in order (each record starts with ``== record ID: STATUS``)."""
    return [m.group(1) for m in re.finditer(r"^== record (\S+): ", stdout, re.M)]


# --- the lines that end a run ------------------------------------------------------------


def test_run_ends_with_the_commands_that_look_at_its_output_and_each_works(done_run: dict[str, Any]) -> None:
    out, records = done_run["out"], done_run["records"]
    lines = done_run["log"].rstrip("\n").splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("look at it: "))
    hint = lines[at:]
    assert lines[at - 1] == f"output: {out}"
    commands = [re.split(r"\s{2,}", line.removeprefix("look at it: ").strip())[0] for line in hint]
    assert [c.split()[1] for c in commands] == ["status", "sample", "show", "export", "view"], hint
    assert all(shlex.split(c)[2] == str(out) for c in commands), hint  # the real path, as typed
    tmp = done_run["tmp"] / "cwd"
    tmp.mkdir()
    for command in commands[:4]:  # view serves until stopped: its own tests run it
        argv = shlex.split(command.replace(" ID", f" {records[0]['id']}"))
        res = cli(*argv[1:], cwd=tmp)
        assert res.returncode == 0, (command, res.stdout, res.stderr)
    assert len((tmp / "data.jsonl").read_text().splitlines()) == len(records)


# --- show ------------------------------------------------------------------------------


def _check_turns(stdout: str, rec: dict[str, Any]) -> None:
    lines = stdout.splitlines()
    n = len(rec["turns"])
    assert f"dialogue: {n} turn{'s' if n != 1 else ''}" in lines
    for i, t in enumerate(rec["turns"], 1):
        (at,) = [k for k, line in enumerate(lines) if line.startswith(f"[{i}] ")]  # the text's lines are indented
        head = lines[at]
        assert head.startswith(f"[{i}] {t['role']} · model {t['model']}"), head
        assert f" · {t['prompt_tokens']} prompt + {t['completion_tokens']} completion tokens · {t['latency_s']:.2f}s" in head, head
        text = t["text"].splitlines()
        if text and not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", t["text"]):  # control characters are printed escaped
            assert lines[at + 1 : at + 1 + len(text)] == ["    " + x for x in text]


def test_show_prints_the_dialogue_with_each_turns_role_model_tokens_latency_and_text(done_run: dict[str, Any]) -> None:
    rec = next(r for r in done_run["records"] if r["status"] == "ok" and len(r["turns"]) == 2)
    res = cli("show", str(done_run["out"]), rec["id"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"record {rec['id']}: ok   (part-000 row ")
    _check_turns(res.stdout, rec)
    result = res.stdout.split("\nresult:\n", 1)[1]
    assert json.loads(result) == rec["result"]
    assert "failed:" not in res.stdout


def test_show_of_a_failed_record_prints_its_kind_message_and_traceback(done_run: dict[str, Any]) -> None:
    out = str(done_run["out"])
    rec = next(r for r in done_run["records"] if r["id"] == "boom1")
    res = cli("show", out, "boom1")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("record boom1: failed agent_error")
    at = lines.index(f"failed: agent_error in role {rec['error']['role']}")
    assert lines[at + 1] == "    " + rec["error"]["message"]
    assert lines[at + 2] == "traceback:"
    assert lines[at + 3 : at + 3 + len(rec["error"]["traceback"])] == ["    " + f for f in rec["error"]["traceback"]]
    assert any("view_agents.py" in f for f in rec["error"]["traceback"])
    res = cli("show", out, "no-choices")  # failed at the source: no turn at all
    assert res.returncode == 0 and "failed: bad_input" in res.stdout and "dialogue: 0 turns" in res.stdout, res.stdout


def test_show_of_an_unknown_id_is_one_line_with_a_close_id_and_exits_2(done_run: dict[str, Any]) -> None:
    out = str(done_run["out"])
    known, typo = "no-choices", "no-choice"
    res = cli("show", out, typo)
    assert res.returncode == 2 and res.stdout == ""
    (line,) = res.stderr.splitlines()
    assert line.startswith(f"matrix-hpc: error: no record with id {typo!r} in {out} (did you mean "), line
    assert repr(known) in line


# --- sample ------------------------------------------------------------------------------


def test_sample_prints_the_first_records_in_store_order(done_run: dict[str, Any]) -> None:
    res = cli("sample", str(done_run["out"]), "-n", "3")
    assert res.returncode == 0, res.stderr
    assert shown_ids(res.stdout) == [r["id"] for r in done_run["records"][:3]]
    assert res.stdout.rstrip().splitlines()[-1].startswith("3 record(s) shown, first in store order")


def test_sample_filters_by_status_and_where(done_run: dict[str, Any]) -> None:
    out, records = str(done_run["out"]), done_run["records"]
    failed = [r["id"] for r in records if r["status"] == "failed"]
    res = cli("sample", out, "--status", "failed", "-n", "10")
    assert res.returncode == 0 and shown_ids(res.stdout) == failed, res.stdout
    assert res.stdout.rstrip().splitlines()[-1] == f"only {len(failed)} of {len(records)} record(s) match (status failed)"

    two = [r["id"] for r in records if (r["result"] or {}).get("turns") == 2]
    res = cli("sample", out, "--where", "result.turns==2", "-n", "100")
    assert res.returncode == 0 and shown_ids(res.stdout) == two and two, res.stdout

    # Several conditions are ANDed; a JSON value is typed (true, a number), a bare word is text.
    want = [r["id"] for r in records if r["status"] == "ok" and r["result"]["agreed"] is False and r["turns"][0]["role"] == "teacher"]
    res = cli("sample", out, "--status", "ok", "--where", "result.agreed==false", "--where", "turns.0.role == teacher", "-n", "100")
    assert res.returncode == 0 and shown_ids(res.stdout) == want, res.stdout
    kinds = [r["id"] for r in records if (r["error"] or {}).get("kind") == "agent_error"]
    res = cli("sample", out, "--where", "error.kind==agent_error")
    assert res.returncode == 0 and shown_ids(res.stdout) == kinds == ["boom1"], res.stdout


def test_sample_with_a_seed_draws_the_same_records_each_time(done_run: dict[str, Any]) -> None:
    out = str(done_run["out"])
    draws = [shown_ids(cli("sample", out, "-n", "4", "--seed", "7").stdout) for _ in range(2)]
    assert draws[0] == draws[1] and len(set(draws[0])) == 4 and set(draws[0]) <= {r["id"] for r in done_run["records"]}


@pytest.mark.parametrize("expr", ["result.turns=2", "result.turns", "result..turns==2", "result.turns==", "result.turns===2"])
def test_sample_with_a_malformed_where_is_one_line_and_exits_2(done_run: dict[str, Any], expr: str) -> None:
    res = cli("sample", str(done_run["out"]), "--where", expr)
    assert res.returncode == 2 and res.stdout == ""
    (line,) = res.stderr.splitlines()
    assert line.startswith(f"matrix-hpc: error: --where {expr!r}: "), line


# --- a reader that closes early ------------------------------------------------------------------


@pytest.mark.parametrize("command", [["status"], ["sample", "-n", "20"]])
def test_output_into_a_closed_pipe_ends_quietly(done_run: dict[str, Any], command: list[str]) -> None:
    """``matrix-hpc status OUT | head``, with the reader gone before anything is written
    (the read end closed before the command starts: EPIPE on the first write, every time)."""
    r, w = os.pipe()
    os.close(r)
    try:
        res = subprocess.run(
            [str(BIN / "matrix-hpc"), command[0], str(done_run["out"]), *command[1:]], stdout=w, stderr=subprocess.PIPE, text=True, timeout=300
        )
    finally:
        os.close(w)
    assert res.stderr == "" and res.returncode == 141, res.stderr


# --- export options --------------------------------------------------------------------------


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    """The documented flattening, written out: nested objects joined with dots, the rest values."""
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flat(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = value
    return out


def test_export_flatten_result_writes_each_result_field_as_a_column(done_run: dict[str, Any]) -> None:
    import pyarrow.parquet as pq

    out, records, tmp = str(done_run["out"]), done_run["records"], done_run["tmp"]
    flat = {r["id"]: _flat("result", r["result"], {}) if r["result"] is not None else {} for r in records}
    columns = {k for f in flat.values() for k in f}
    assert {"result.turns", "result.agreed", "result.final.teacher", "result.answers.student"} <= columns

    res = cli("export", out, "--format", "parquet", "--to", str(tmp / "flat.parquet"), "--flatten-result")
    assert res.returncode == 0, res.stderr
    table = pq.read_table(tmp / "flat.parquet")
    assert "result" not in table.column_names and {c for c in table.column_names if c.startswith("result.")} == columns
    assert str(table.schema.field("result.turns").type) == "int64" and str(table.schema.field("result.agreed").type) == "bool"
    for row in table.to_pylist():
        assert {k: row[k] for k in columns} == {k: flat[row["id"]].get(k) for k in columns}, row["id"]

    res = cli("export", out, "--to", str(tmp / "flat.jsonl"), "--flatten-result")
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in (tmp / "flat.jsonl").read_text().splitlines()]
    assert len(lines) == len(records)
    for line in lines:
        assert "result" not in line and {k: v for k, v in line.items() if k.startswith("result.")} == flat[line["id"]]


def test_export_in_dataset_order(done_run: dict[str, Any]) -> None:
    import pyarrow.parquet as pq

    out, records, tmp = done_run["out"], done_run["records"], done_run["tmp"]
    dataset_ids = [r["id"] for r in done_run["rows"]]
    assert [r["id"] for r in records] != dataset_ids  # tasks finished out of order (the failed ones first)
    res = cli("export", str(out), "--to", str(tmp / "ordered.jsonl"), "--dataset-order")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"wrote {len(records)} records in dataset order to ")
    assert [json.loads(line)["id"] for line in (tmp / "ordered.jsonl").read_text().splitlines()] == dataset_ids

    res = cli("export", str(out), "--format", "hf", "--to", str(tmp / "ordered-hf"), "--dataset-order", "--status", "failed")
    assert res.returncode == 0, res.stderr
    (shard,) = (tmp / "ordered-hf" / "data").iterdir()
    assert pq.read_table(shard).column("id").to_pylist() == [i for i in dataset_ids if i in ("boom1", "no-choices")]

    # The dataset changed since the run: a copy of the output whose run.json names a dataset of
    # the rows reversed, two left out. Those two records come last, in store order, and are named.
    import shutil

    copy = tmp / "out-copy"
    shutil.copytree(out, copy)
    info = json.loads((copy / "run.json").read_text())
    kept = done_run["rows"][::-1][2:]
    info["config"]["dataset"]["path"] = str(write_jsonl(tmp / "changed.jsonl", kept))
    (copy / "run.json").write_text(json.dumps(info))
    res = cli("export", str(copy), "--to", str(tmp / "changed.jsonl.out"), "--dataset-order")
    assert res.returncode == 0, res.stderr
    assert "note: 2 record(s) of the store have an id the dataset does not hold now: written after the others, in store order" in res.stdout.splitlines()
    left_out = [r["id"] for r in records if r["id"] not in {k["id"] for k in kept}]
    got = [json.loads(line)["id"] for line in (tmp / "changed.jsonl.out").read_text().splitlines()]
    assert got == [k["id"] for k in kept] + left_out


def test_parquet_columns_no_row_fills_keep_their_type(done_run: dict[str, Any]) -> None:
    """Only ok records: ``error`` is null in every row, and so is every turn's ``error``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out, tmp = str(done_run["out"]), done_run["tmp"]
    error_type = pa.struct([("kind", pa.string()), ("message", pa.string()), ("role", pa.string()), ("traceback", pa.list_(pa.string()))])
    res = cli("export", out, "--format", "parquet", "--to", str(tmp / "ok.parquet"), "--status", "ok")
    assert res.returncode == 0, res.stderr
    res = cli("export", out, "--format", "hf", "--to", str(tmp / "ok-hf"), "--status", "ok")
    assert res.returncode == 0, res.stderr
    for path in (tmp / "ok.parquet", *(tmp / "ok-hf" / "data").iterdir()):
        table = pq.read_table(path)
        assert table.num_rows == sum(r["status"] == "ok" for r in done_run["records"])
        assert table.column("error").null_count == table.num_rows and table.schema.field("error").type == error_type
        assert table.schema.field("error_kind").type == pa.string()
        turn = table.schema.field("turns").type.value_type
        assert turn.field("error").type == pa.string() and turn.field("latency_s").type == pa.float64() and turn.field("replayed").type == pa.bool_()
