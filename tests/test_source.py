"""The source: stable ids, skipping done ids, and every bad row kept as a failed task."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from matrix_hpc.runtime.source import DatasetError, SourceOptions, count_rows, iter_tasks

from .conftest import write_jsonl


def opts(path: Path, **kw: object) -> SourceOptions:
    return SourceOptions(path=path, entry_role="first", required_fields=("question",), max_row_bytes=1000, **kw)  # type: ignore[arg-type]


def test_bad_rows_become_failed_tasks_with_reasons(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"id": "a", "question": "ok?"},
            '{"id": "b", "question": ',  # malformed
            {"id": "c", "text": "no question"},
            {"id": "d", "question": "x" * 2000},
            "[1, 2]",
            "",
            {"id": "a", "question": "again"},
            {"question": "no id"},
        ],
    )
    tasks = list(iter_tasks(opts(path)))
    by_id = {t.id: t for t in tasks}
    assert by_id["a"].next_role == "first" and by_id["a"].error is None
    malformed = [t for t in tasks if t.error and "invalid JSON" in t.error.message]
    assert len(malformed) == 1 and malformed[0].error.message.startswith("line 2: invalid JSON")
    assert by_id["c"].error.message == "line 3: row c is missing required field 'question'"
    assert by_id["d"].error.message.startswith("line 4: row d is 20") and "over dataset.max_row_bytes=1000" in by_id["d"].error.message
    assert len(json.dumps(by_id["d"].row)) < 1000  # a preview, not the whole over-long row
    assert any(t.error and t.error.message == "line 5: expected a JSON object, got an array" for t in tasks)
    dup = by_id["a#dup@line7"]
    assert dup.error.message == "line 7: duplicate id 'a' (first at line 1)"
    hashed = [t for t in tasks if t.row.get("question") == "no id"]
    assert hashed[0].id.startswith("h") and hashed[0].error is None
    assert len(tasks) == 7 and all(t.error.kind == "bad_input" for t in tasks if t.error)
    # Ids are stable, so a second pass skips exactly what is done.
    ids = [t.id for t in tasks]
    counts: dict[str, int] = {}
    assert [t.id for t in iter_tasks(opts(path), set(ids[:4]), counts)] == ids[4:]
    assert counts["skipped"] == 4
    assert count_rows(opts(path)) == 7


def test_parquet_and_limit(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": i, "question": f"q{i}"} for i in range(10)]), path)
    assert [t.id for t in iter_tasks(opts(path, limit=4))] == ["0", "1", "2", "3"]
    assert count_rows(opts(path, limit=4)) == 4 and count_rows(opts(path)) == 10


def test_missing_or_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file"):
        list(iter_tasks(opts(tmp_path / "nope.jsonl")))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match="set dataset.format"):
        list(iter_tasks(opts(tmp_path / "d.csv")))
