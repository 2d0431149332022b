"""Export committed records to JSONL or Parquet."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

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
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = []
        for rec in records:
            flat = {k: v for k, v in rec.items() if k not in _JSON_COLUMNS}
            flat["error_kind"] = (rec.get("error") or {}).get("kind")
            flat["prompt_tokens"] = (rec.get("usage") or {}).get("prompt_tokens", 0)
            flat["completion_tokens"] = (rec.get("usage") or {}).get("completion_tokens", 0)
            for k in _JSON_COLUMNS:
                flat[k] = json.dumps(rec.get(k), ensure_ascii=False)
            rows.append(flat)
        pq.write_table(pa.Table.from_pylist(rows), to)
        return len(rows)
    raise ValueError(f"unknown export format {fmt!r} (expected jsonl or parquet)")
