"""Export committed records to JSONL or Parquet."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator, Literal

from .zarr_store import StoreReader

__all__ = ["export_store"]

log = logging.getLogger(__name__)

# Parquet gets the record's top-level fields as columns; nested parts stay JSON text
# so the schema does not depend on what a workflow puts in its results.
_JSON_COLUMNS = ("error", "row", "result", "turns", "usage")


def export_store(root: str | Path, to: str | Path, fmt: Literal["jsonl", "parquet"] = "jsonl", status: str | None = None) -> int:
    """Write every committed record (optionally only ``status``) to ``to``; returns the count."""
    reader = StoreReader(root)
    to = Path(to)
    to.parent.mkdir(parents=True, exist_ok=True)
    records = (r for r in reader.iter_records() if status is None or r["status"] == status)
    if fmt == "jsonl":
        n = 0
        with open(to, "w") as fh:
            for rec in records:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                n += 1
        return n
    if fmt == "parquet":
        return _write_parquet(records, to)
    raise ValueError(f"unknown export format {fmt!r} (expected jsonl or parquet)")


_ROW_GROUP = 8192  # records per Parquet row group: export memory stays flat whatever the store's size
# Typed columns; any other top-level field of a record is kept as JSON text, so the
# schema is fixed before the first row group (a column all null in it stays typed).
_TYPES = {"id": "string", "status": "string", "error_kind": "string", "attempt": "int64", "hops": "int64",
          "created_at": "float64", "finished_at": "float64", "prompt_tokens": "int64", "completion_tokens": "int64"}  # fmt: skip


def _flat(rec: dict[str, Any]) -> dict[str, Any]:
    flat = {k: v if k in _TYPES else json.dumps(v, ensure_ascii=False) for k, v in rec.items() if k not in _JSON_COLUMNS}
    flat["error_kind"] = (rec.get("error") or {}).get("kind")
    flat["prompt_tokens"] = (rec.get("usage") or {}).get("prompt_tokens", 0)
    flat["completion_tokens"] = (rec.get("usage") or {}).get("completion_tokens", 0)
    for k in _JSON_COLUMNS:
        flat[k] = json.dumps(rec.get(k), ensure_ascii=False)
    return flat


def _write_parquet(records: Iterator[dict[str, Any]], to: Path) -> int:
    """Stream records into row groups of ``_ROW_GROUP`` rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 0
    writer: Any = None
    schema: Any = None
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal writer, schema, n, batch
        if writer is None:
            names = list(dict.fromkeys([*(batch[0] if batch else {}), *_TYPES, *_JSON_COLUMNS]))
            schema = pa.schema([(k, pa.type_for_alias(_TYPES.get(k, "string"))) for k in names])
            writer = pq.ParquetWriter(to, schema)
        writer.write_table(pa.Table.from_pylist([{k: row.get(k) for k in schema.names} for row in batch], schema=schema))
        n, batch = n + len(batch), []

    try:
        for rec in records:
            batch.append(_flat(rec))
            if len(batch) >= _ROW_GROUP:
                flush()
        if batch or writer is None:
            flush()
    finally:
        if writer is not None:
            writer.close()
    return n
