"""The source: dataset rows → tasks, with stable ids and bad rows as failed tasks.

Bad input is data, not a crash: a malformed JSONL line, a row that is not an
object, a missing required field, an over-long row or a repeated id each become a
task that is already failed with a reason naming the line and id; it goes to the
store like any other result.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .task import Task, content_id

__all__ = ["DatasetError", "DatasetScan", "SourceOptions", "iter_tasks", "count_rows", "scan_dataset"]

log = logging.getLogger(__name__)

_PREVIEW = 500  # characters of a bad row kept in its record


class DatasetError(RuntimeError):
    """The dataset as a whole cannot be read (missing file, unknown format)."""


@dataclass(frozen=True)
class SourceOptions:
    path: Path
    entry_role: str
    format: str = "auto"
    id_field: str | None = "id"
    """``None``: every row's id is a hash of its content."""
    required_fields: tuple[str, ...] = ()
    max_row_bytes: int = 65536
    limit: int | None = None


def _format(opts: SourceOptions) -> str:
    if opts.format != "auto":
        return opts.format
    suffix = opts.path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise DatasetError(f"dataset.path: cannot tell the format of {opts.path.name} (set dataset.format to jsonl or parquet)")


@dataclass(frozen=True)
class DatasetScan:
    rows: int
    """Rows the source will yield (non-blank lines for JSONL), honouring ``limit``."""
    missing_id: int
    """Rows without ``id_field`` (they get a content hash as their id)."""


def scan_dataset(opts: SourceOptions) -> DatasetScan:
    """Count the rows, and those that lack ``id_field``, in one pass before the run.

    For JSONL a line lacks the field when its text does not contain ``"FIELD"`` (cheap,
    no JSON parsing; a nested key of that name can only make the count too low).
    """
    if not opts.path.is_file():
        raise DatasetError(f"dataset.path: no such file {opts.path}")
    limit = opts.limit if opts.limit is not None else float("inf")
    n = missing = 0
    if _format(opts) == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(opts.path)
        n = int(min(pf.metadata.num_rows, limit))
        if opts.id_field is not None and opts.id_field not in pf.schema_arrow.names:
            missing = n
        elif opts.id_field is not None:
            seen = 0
            for batch in pf.iter_batches(batch_size=65536, columns=[opts.id_field]):
                col = batch.column(0)[: max(0, n - seen)]
                missing += col.null_count
                seen += len(col)
                if seen >= n:
                    break
    else:
        needle = json.dumps(opts.id_field).encode() if opts.id_field is not None else None
        with open(opts.path, "rb") as fh:
            for line in fh:
                if n >= limit:
                    break
                if line.strip():
                    n += 1
                    missing += needle is not None and needle not in line
    return DatasetScan(rows=n, missing_id=missing)


def count_rows(opts: SourceOptions) -> int:
    """Rows the source will yield (non-blank lines for JSONL), honouring ``limit``."""
    return scan_dataset(opts).rows


def _raw_rows(opts: SourceOptions) -> Iterator[tuple[str, bytes | dict[str, Any]]]:
    """(where, raw line or row dict) for each row, ``where`` naming it for errors."""
    if not opts.path.is_file():
        raise DatasetError(f"dataset.path: no such file {opts.path}")
    if _format(opts) == "parquet":
        import pyarrow.parquet as pq

        n = 0
        for batch in pq.ParquetFile(opts.path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                n += 1
                yield f"row {n}", row
    else:
        with open(opts.path, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    yield f"line {lineno}", line.rstrip(b"\r\n")


def _failed(tid: str, where: str, row: dict[str, Any], kind: str, message: str) -> Task:
    task = Task(id=tid, row=row, next_role=None)
    task.fail(kind, f"{where}: {message}", role="source")
    return task


def _to_task(opts: SourceOptions, where: str, raw: bytes | dict[str, Any]) -> Task:
    if isinstance(raw, bytes):
        size = len(raw)
        try:
            row = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            text = raw.decode(errors="replace")
            return _failed(content_id(raw), where, {"_raw": text[:_PREVIEW]}, "bad_input", f"invalid JSON ({exc})")
    else:
        row = raw
        size = len(json.dumps(row, default=str).encode())
    if not isinstance(row, dict):
        return _failed(content_id(json.dumps(row, default=str)), where, {"_raw": json.dumps(row, default=str)[:_PREVIEW]}, "bad_input", f"expected a JSON object, got {type(row).__name__}")
    rid = row.get(opts.id_field) if opts.id_field is not None else None
    tid = str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid) else content_id(json.dumps(row, sort_keys=True, default=str))
    if size > opts.max_row_bytes:
        preview = {"_raw": json.dumps(row, default=str)[:_PREVIEW], "_bytes": size}
        return _failed(tid, where, preview, "bad_input", f"row {tid} is {size} bytes, over dataset.max_row_bytes={opts.max_row_bytes}")
    missing = [f for f in opts.required_fields if row.get(f) in (None, "")]
    if missing:
        return _failed(tid, where, row, "bad_input", f"row {tid} is missing required field {missing[0]!r}")
    return Task(id=tid, row=row, next_role=opts.entry_role)


def iter_tasks(opts: SourceOptions, done: set[str] | None = None, counts: dict[str, int] | None = None) -> Iterator[Task]:
    """Tasks for every row not in ``done``; bad rows come out already failed.

    ``counts["skipped"]`` is kept up to date with the rows skipped as done.
    """
    done = done or set()
    counts = counts if counts is not None else {}
    counts.setdefault("skipped", 0)
    # id -> number of its first row ("line 7" keeps 7): an int per row, not a string, as
    # this map holds every id of the dataset for the whole run.
    seen: dict[str, int] = {}
    for n, (where, raw) in enumerate(_raw_rows(opts)):
        if opts.limit is not None and n >= opts.limit:
            return
        task = _to_task(opts, where, raw)
        kind, _, num = where.partition(" ")
        if task.id in seen:
            first = f"{kind} {seen[task.id]}"
            # Keep the row, under an id of its own, so nothing is silently dropped.
            task = _failed(f"{task.id}#dup@{where.replace(' ', '')}", where, task.row, "bad_input", f"duplicate id {task.id!r} (first at {first})")
        else:
            seen[task.id] = int(num)
        if task.id in done:
            counts["skipped"] += 1
        else:
            yield task
