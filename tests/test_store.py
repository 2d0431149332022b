"""The zarr store: exactly once across commits, reopen, a SIGKILLed writer, and export."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from matrix_hpc.store import RecordRow, StoreLockedError, StoreReader, StoreWriter, export_store


def row(i: int, status: str = "ok") -> RecordRow:
    err = {"kind": "bad_input", "message": "x"} if status == "failed" else None
    return RecordRow.from_record({"id": f"t{i:05d}", "status": status, "error": err, "result": {"n": i}, "usage": {"prompt_tokens": i, "completion_tokens": 1}})


def test_commits_append_whole_chunks_and_reopen(tmp_path: Path) -> None:
    w = StoreWriter(tmp_path, chunk_rows=8)
    for lo, hi in [(0, 3), (3, 11), (11, 12), (12, 30)]:
        w.append([row(i) for i in range(lo, hi)])
        assert w.commit() == hi - lo
    w.close()
    w = StoreWriter(tmp_path)  # reopen: the partly filled last chunk is carried over
    assert w.rows == 30 and w.chunk_rows == 8
    w.append([row(i) for i in range(30, 35)])
    w.close()
    r = StoreReader(tmp_path)
    assert r.column("id") == [f"t{i:05d}" for i in range(35)]
    assert [rec["result"]["n"] for rec in r.iter_records()] == list(range(35))


def test_a_commit_rewrites_the_tail_chunk_whole_without_reading_it_back(tmp_path: Path) -> None:
    """Each commit rewrites the partly filled last chunk from the rows the writer keeps, padded
    with the fill value: zarr never reads and decodes the chunk's previous version to merge into
    it (a quarter of a commit's CPU, paid every second). So a tail chunk that no longer decodes is
    replaced, not read: this fails where a commit writes part of a chunk."""
    w = StoreWriter(tmp_path, chunk_rows=8)
    w.append([row(i) for i in range(3)])
    w.commit()
    tails = sorted(tmp_path.glob("part-*/data.zarr/*/c/0"))
    assert {c.parent.parent.name for c in tails} >= {"id", "record", "prompt_tokens"}  # all-fill chunks are not written
    for chunk in tails:
        chunk.write_bytes(b"not a chunk")
    w.append([row(i) for i in range(3, 5)])
    assert w.commit() == 2
    w.close()
    r = StoreReader(tmp_path)
    assert r.column("id") == [f"t{i:05d}" for i in range(5)]
    assert [rec["result"]["n"] for rec in r.iter_records()] == list(range(5))
    assert [rec["usage"]["prompt_tokens"] for rec in r.iter_records()] == list(range(5))


def test_duplicate_ids_are_refused(tmp_path: Path) -> None:
    w = StoreWriter(tmp_path, chunk_rows=4)
    w.append([row(0), row(1)])
    w.commit()
    assert w.append([row(1), row(2), row(2)]) == ["t00001", "t00002"]
    w.close()
    w = StoreWriter(tmp_path)
    assert w.append([row(0)]) == ["t00000"]
    w.close()
    assert StoreReader(tmp_path).column("id") == ["t00000", "t00001", "t00002"]


def test_second_writer_is_refused_while_first_lives(tmp_path: Path) -> None:
    w = StoreWriter(tmp_path)
    with pytest.raises(StoreLockedError, match="being written by another process"):
        StoreWriter(tmp_path)
    assert StoreReader(tmp_path).writer_active()
    w.close()
    assert not StoreReader(tmp_path).writer_active()
    StoreWriter(tmp_path).close()


def test_uncommitted_rows_are_invisible_and_overwritten(tmp_path: Path) -> None:
    w = StoreWriter(tmp_path, chunk_rows=4)
    w.append([row(i) for i in range(6)])
    w.commit()
    # Rows written to zarr but never committed (a crash between chunk write and commit.json):
    w._arrays["id"][6:8] = ["ghost1", "ghost2"]
    (tmp_path / "part-000" / "data.zarr" / "id" / "c" / "9.partial").write_text("torn")
    w._lock.release()
    assert StoreReader(tmp_path).ids() == {f"t{i:05d}" for i in range(6)}
    w = StoreWriter(tmp_path)
    assert not list(tmp_path.rglob("*.partial"))
    w.append([row(6)])
    w.close()
    assert StoreReader(tmp_path).column("id") == [f"t{i:05d}" for i in range(7)]


WRITER = """
import sys, time
from matrix_hpc.store import StoreWriter, RecordRow
w = StoreWriter(sys.argv[1], chunk_rows=16)
i = w.rows
print(i, flush=True)
while True:
    n = (i * 7) % 23 + 1
    w.append([RecordRow.from_record({"id": f"t{j:05d}", "status": "ok", "result": {"n": j}}) for j in range(i, i + n)])
    w.commit()
    i += n
"""


def committed_rows(root: Path) -> int:
    commit = root / "part-000" / "commit.json"
    return json.loads(commit.read_text())["rows"] if commit.is_file() else 0


def test_sigkilled_writer_loses_no_committed_row_and_duplicates_none(tmp_path: Path) -> None:
    rng = random.Random(7)
    seen_rows = []
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        start = int(proc.stdout.readline())
        assert start == (seen_rows[-1] if seen_rows else 0)  # resumes exactly where the commit says
        # Kill at a random point after this life has committed something (a loaded machine
        # may take a while to get there: wait for progress, not for a fixed time).
        deadline = time.monotonic() + 60
        while committed_rows(tmp_path) <= start and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.8))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        rows = json.loads((tmp_path / "part-000" / "commit.json").read_text())["rows"]
        assert rows > start
        seen_rows.append(rows)
        ids = StoreReader(tmp_path).column("id")
        assert ids == [f"t{j:05d}" for j in range(rows)]  # a gap-free prefix, each id once
    assert [r["result"]["n"] for r in StoreReader(tmp_path).iter_records()] == list(range(seen_rows[-1]))


def test_counts_and_export(tmp_path: Path) -> None:
    w = StoreWriter(tmp_path / "s", chunk_rows=4)
    w.append([row(0), row(1, "failed"), row(2), row(3, "failed"), row(4)])
    w.close()
    counts = StoreReader(tmp_path / "s").counts()
    assert counts == {"records": 5, "ok": 3, "failed": 2, "failed_by_kind": {"bad_input": 2}, "prompt_tokens": 10, "completion_tokens": 5}
    assert export_store(tmp_path / "s", tmp_path / "a.jsonl").records == 5
    lines = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == [f"t{i:05d}" for i in range(5)]
    assert export_store(tmp_path / "s", tmp_path / "a.parquet", "parquet", status="failed").records == 2
    table = pq.read_table(tmp_path / "a.parquet").to_pylist()
    assert [t["id"] for t in table] == ["t00001", "t00003"]
    assert table[0]["error_kind"] == "bad_input" and table[0]["result"] == {"n": 1}
