"""Export committed records to JSONL or Parquet.

Parquet keeps the record's shape: nested fields (``row``, ``result``, ``turns``,
``usage``, ``error``) become Arrow structs and lists with real nulls, so pandas,
polars and ``datasets`` users get columns, not JSON text to decode. Records stream
through in row groups (bounded memory): a first pass over the store finds one Arrow
type per column that every record fits; a column whose values do not fit one type
(an int here and a string there) is written as JSON text instead, and the result
names it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .textsafe import record_json
from .zarr_store import StoreReader

__all__ = ["ExportResult", "export_store"]

log = logging.getLogger(__name__)

ROW_GROUP = 2048  # records per Parquet row group: what export holds in memory at once
_FIRST = ("id", "status", "error_kind", "prompt_tokens", "completion_tokens")  # flat, handy columns first


@dataclass
class ExportResult:
    records: int
    json_columns: list[str] = field(default_factory=list)
    """Parquet columns written as JSON text because their values do not fit one Arrow type."""


def export_store(root: str | Path, to: str | Path, fmt: Literal["jsonl", "parquet"] = "jsonl", status: str | None = None) -> ExportResult:
    """Write every committed record (optionally only ``status``) to ``to``."""
    reader = StoreReader(root)
    to = Path(to)
    to.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        n = 0
        with open(to, "w", encoding="utf-8") as fh:  # UTF-8 whatever the locale says
            for rec in _records(reader, status):
                fh.write(record_json(rec) + "\n")  # stored records encode; this makes sure
                n += 1
        return ExportResult(n)
    if fmt == "parquet":
        return _write_parquet(reader, to, status)
    raise ValueError(f"unknown export format {fmt!r} (expected jsonl or parquet)")


def _records(reader: StoreReader, status: str | None) -> Iterator[dict[str, Any]]:
    return (r for r in reader.iter_records() if status is None or r["status"] == status)


def _flat(rec: dict[str, Any]) -> dict[str, Any]:
    usage = rec.get("usage") or {}
    out = {
        "id": rec.get("id"),
        "status": rec.get("status"),
        "error_kind": (rec.get("error") or {}).get("kind"),
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "completion_tokens": usage.get("completion_tokens", 0),
    }
    out.update((k, v) for k, v in rec.items() if k not in out)
    return out


def _batches(
    reader: StoreReader, status: str | None, extra: Callable[[dict[str, Any]], dict[str, Any]] | None = None, size: int = ROW_GROUP
) -> Iterator[list[dict[str, Any]]]:
    """Flat records in row groups; ``extra(record)``: more columns for each (the hf export's messages)."""
    batch: list[dict[str, Any]] = []
    for rec in _records(reader, status):
        flat = _flat(rec)
        if extra is not None:
            flat.update(extra(rec))
        batch.append(flat)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _writable(tp: Any) -> bool:
    """Parquet cannot store a struct with no fields (``{}`` in every row)."""
    import pyarrow as pa

    if pa.types.is_struct(tp):
        return tp.num_fields > 0 and all(_writable(tp.field(i).type) for i in range(tp.num_fields))
    if pa.types.is_list(tp) or pa.types.is_large_list(tp):
        return _writable(tp.value_type)
    return True


MAX_SCHEMA_DEPTH = 90
"""Parquet schema levels a column may take (a list takes 2, a struct 1): Parquet readers
refuse a file whose schema nests past 100 (pyarrow reads back what it wrote only up to
there), so a deeper column is written as JSON text."""


def _schema_depth(tp: Any) -> int:
    import pyarrow as pa

    if pa.types.is_struct(tp):
        return 1 + max((_schema_depth(tp.field(i).type) for i in range(tp.num_fields)), default=0)
    if pa.types.is_list(tp) or pa.types.is_large_list(tp):
        return 2 + _schema_depth(tp.value_type)
    return 1


def _infer_types(batches: Callable[[], Iterator[list[dict[str, Any]]]], json_cols: set[str]) -> tuple[list[str], dict[str, Any]]:
    """First pass: every column's name, in order, and one Arrow type all its values fit."""
    import pyarrow as pa

    names: dict[str, None] = dict.fromkeys(_FIRST)
    types: dict[str, Any] = {}
    for batch in batches():
        for rec in batch:
            names.update(dict.fromkeys(rec))
        for name in names:
            if name in json_cols:
                continue
            try:
                tp = pa.array([r.get(name) for r in batch]).type
                if name in types:
                    tp = pa.unify_schemas([pa.schema([(name, types[name])]), pa.schema([(name, tp)])], promote_options="permissive").field(name).type
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
                json_cols.add(name)
                types.pop(name, None)
                continue
            types[name] = tp
    for name in list(types):
        if _schema_depth(types[name]) > MAX_SCHEMA_DEPTH:
            json_cols.add(name)  # nested too deep for Parquet readers
            del types[name]
        elif not _writable(types[name]):
            # Only empty objects so far: nothing to lose as text.
            json_cols.add(name)
            del types[name]
    return list(names), types


def _write_parquet(reader: StoreReader, to: Path, status: str | None) -> ExportResult:
    import pyarrow as pa
    import pyarrow.parquet as pq

    json_cols: set[str] = set()
    while True:  # a column that fails to convert in the second pass is retried as JSON text
        names, types = _infer_types(lambda: _batches(reader, status), json_cols)
        schema = pa.schema([(n, pa.string() if n in json_cols else types.get(n, pa.null())) for n in names])
        tmp = to.with_name(f".{to.name}.partial")
        n = 0
        try:
            with pq.ParquetWriter(tmp, schema) as writer:
                for batch in _batches(reader, status):
                    writer.write_table(arrow_table(batch, schema, json_cols))
                    n += len(batch)
        except _Misfit as exc:
            tmp.unlink(missing_ok=True)
            json_cols.add(exc.column)
            continue
        tmp.replace(to)
        if json_cols:
            log.info("export: columns %s written as JSON text", sorted(json_cols))
        return ExportResult(n, sorted(json_cols))


class _Misfit(Exception):
    def __init__(self, column: str) -> None:
        super().__init__(column)
        self.column = column


def arrow_table(batch: list[dict[str, Any]], schema: Any, json_cols: set[str] | frozenset[str]) -> Any:
    """One batch of records as an Arrow table of ``schema``; ``json_cols`` are written as JSON
    text. A value the column's type cannot hold raises :class:`_Misfit` naming the column."""
    import pyarrow as pa

    cols = []
    for f in schema:
        values = [r.get(f.name) for r in batch]
        if f.name in json_cols:
            values = [None if v is None else json.dumps(v, ensure_ascii=False) for v in values]
        try:
            cols.append(pa.array(values, type=f.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
            raise _Misfit(f.name) from exc
    return pa.Table.from_arrays(cols, schema=schema)
