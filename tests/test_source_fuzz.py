"""Fuzzed intake: hostile JSONL and Parquet (tests/fuzz_datasets.py) through the source,
then through `matrix-hpc run` (real Ray, the real embedded engine, a real zarr store).

Each identifiable row ends as exactly one record, ok or failed with a reason that
names its line (or Parquet row); an unreadable line is reported by its number; good
rows arrive untouched; the pre-run count is what the source yields; a re-run has
nothing to do.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from matrix_hpc.runtime.source import DatasetError, SourceOptions, count_rows, iter_tasks, scan_dataset

from .conftest import BIN, job_config, store_records
from .fuzz_datasets import Case, Hostile, hostile_jsonl, hostile_parquet, odd_id_parquet, replaced

REQUIRED = ("question", "choices", "answer")  # the collab_reasoning workflow's


def opts(path: Path, **kw: Any) -> SourceOptions:
    return SourceOptions(path=path, entry_role="teacher", required_fields=REQUIRED, **kw)


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON (NaN equals NaN; lone surrogates compared as escapes)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def check_cases(h: Hostile, got: list[dict[str, Any]], stored: bool = False) -> None:
    """``got``: records (``id``, ``status``, ``error``, ``row``), one per task. Each case
    matches exactly one of them and nothing else is there. ``stored``: as the store keeps
    them (text UTF-8 cannot encode replaced, and said so)."""
    assert len(got) == len(h.cases), f"{len(got)} records for {len(h.cases)} rows"
    ids = Counter(r["id"] for r in got)
    assert max(ids.values()) == 1, [i for i, n in ids.items() if n > 1]
    by_id = {r["id"]: r for r in got}
    ok_hashed = [r for r in got if r["status"] == "ok" and r["id"].startswith("h")]
    for case in h.cases:
        if case.status == "failed":
            hits = [r for r in got if r["error"] and r["error"]["message"].startswith(f"{case.where}: ")]
            assert len(hits) == 1, (case, hits)
            rec = hits[0]
            assert rec["status"] == "failed" and rec["error"]["kind"] == "bad_input", rec["error"]
            assert rec["error"]["message"].startswith(case.reason), (case.reason, rec["error"]["message"])
            _check_id(case, rec)
            continue
        want = replaced(case.row) if stored and case.replaced else case.row
        if case.id is not None:
            rec = by_id.get(case.id)
            assert rec is not None, f"{case.where}: no record with id {case.id!r}"
        else:
            hits = [r for r in ok_hashed if _same(r["row"], want)]
            assert len(hits) == 1, (case, hits)
            rec = hits[0]
        assert rec["status"] == "ok", (case.where, rec["error"])
        _check_id(case, rec)
        assert _same(rec["row"], want), (case.where, rec["row"], want)
        if stored:
            assert ("text_replaced" in rec) == case.replaced, (case.where, rec.get("text_replaced"))


def _check_id(case: Case, rec: dict[str, Any]) -> None:
    if case.id is None:
        assert rec["id"].startswith("h") and len(rec["id"].partition("#")[0]) == 21, rec["id"]
    else:
        assert rec["id"] == case.id
    rec["id"].encode("utf-8")  # the store keeps the id as it is: resume compares the same text


def task_records(h: Hostile, **kw: Any) -> list[dict[str, Any]]:
    tasks = list(iter_tasks(opts(h.path, **kw)))
    assert all(t.next_role == "teacher" for t in tasks if not t.error)
    return [t.to_record() for t in tasks]


def check_source(h: Hostile) -> None:
    """The tasks match the cases; the pre-run count agrees, with and without a limit;
    a second pass that knows every id skips them all."""
    recs = task_records(h)
    check_cases(h, recs)
    assert count_rows(opts(h.path)) == h.rows == len(recs)
    for limit in {1, min(13, h.rows), h.rows - 1}:
        assert count_rows(opts(h.path, limit=limit)) == len(task_records(h, limit=limit)) == limit
    counts: dict[str, int] = {}
    assert list(iter_tasks(opts(h.path), {r["id"] for r in recs}, counts)) == []
    assert counts["skipped"] == h.rows


def test_hostile_jsonl_rows_each_end_as_one_task(tmp_path: Path) -> None:
    h = hostile_jsonl(tmp_path / "hostile.jsonl", huge_line=True)
    check_source(h)
    scan = scan_dataset(opts(h.path))  # reads bytes: invalid UTF-8 is no problem
    assert scan.rows == h.rows and 0 < scan.missing_id < h.rows


def test_hostile_parquet_rows_each_end_as_one_task(tmp_path: Path) -> None:
    check_source(hostile_parquet(tmp_path / "hostile.parquet"))
    check_source(odd_id_parquet(tmp_path / "odd_ids.parquet"))


def test_parquet_ints_and_nulls_as_ids(tmp_path: Path) -> None:
    path = tmp_path / "ints.parquet"
    rows = [{"id": 7, "question": "q"}, {"id": None, "question": "q"}, {"id": 7, "question": "again"}, {"id": -3, "question": "q"}]
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([("id", pa.int64()), ("question", pa.string())])), path)
    tasks = list(iter_tasks(SourceOptions(path=path, entry_role="teacher")))
    assert [t.id for t in tasks][::2] == ["7", "7#dup@row3"] and tasks[3].id == "-3" and tasks[1].id.startswith("h")
    assert tasks[2].error.message == "row 3: duplicate id '7' (first at row 1)"
    assert scan_dataset(SourceOptions(path=path, entry_role="teacher")).missing_id == 1


def test_unreadable_parquet_file_is_one_dataset_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": str(i), "question": "q"} for i in range(100)]), path)
    path.write_bytes(path.read_bytes()[:-100])  # the footer is gone: no row can be found
    for call in (scan_dataset, lambda o: list(iter_tasks(o))):
        with pytest.raises(DatasetError, match=f"cannot read {path} as Parquet"):
            call(opts(path))


# --- end to end: `matrix-hpc run`, then the same command again ---------------------------


def run(cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "matrix-hpc"), "run", str(cfg)], capture_output=True, text=True, timeout=600, start_new_session=True)


def run_twice(tmp: Path, h: Hostile) -> None:
    cfg = job_config(tmp, h.path, **{"workflow.params.max_turns": 1, "llm.max_tokens": 8})
    first = run(cfg)
    assert first.returncode == 0, first.stdout + first.stderr
    out = tmp / "out"
    records = store_records(out)
    check_cases(h, records, stored=True)
    assert f"{sum(c.status == 'ok' for c in h.cases)} ok, {sum(c.status == 'failed' for c in h.cases)} failed" in first.stdout, first.stdout
    ok = [r for r in records if r["status"] == "ok"]
    assert all(r["turns"] and r["turns"][0]["role"] == "teacher" for r in ok)  # the agents took them
    again = run(cfg)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"0 ok, 0 failed, {h.rows} skipped" in again.stdout, again.stdout
    assert {r["id"]: r["finished_at"] for r in store_records(out)} == {r["id"]: r["finished_at"] for r in records}
    info = json.loads((out / "run.json").read_text())
    assert info["input_rows"] == h.rows and info["status"] == "finished", info.get("error")


@pytest.mark.slow
def test_run_on_hostile_jsonl_records_every_row_once_and_a_rerun_has_nothing_to_do(tmp_path: Path) -> None:
    run_twice(tmp_path, hostile_jsonl(tmp_path / "hostile.jsonl"))


@pytest.mark.slow
def test_run_on_hostile_parquet_records_every_row_once_and_a_rerun_has_nothing_to_do(tmp_path: Path) -> None:
    run_twice(tmp_path, hostile_parquet(tmp_path / "hostile.parquet"))
