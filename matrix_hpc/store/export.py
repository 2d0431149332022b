"""Export committed records to JSONL or Parquet.

Parquet keeps the record's shape: nested fields (``row``, ``result``, ``turns``,
``usage``, ``error``) become Arrow structs and lists with real nulls, so pandas,
polars and ``datasets`` users get columns, not JSON text to decode. Records stream
through in row groups (bounded memory): a first pass over the store finds one Arrow
type per column that every record fits; a column whose values do not fit one type
(an int here and a string there) is written as JSON text instead, and the result
names it.

The record's own columns (``id``, ``status``, ``error``, ``turns``, ``usage``, ...) have fixed
Arrow types (:func:`known_types`): a column no row fills (``error`` when every record is ok,
``turns[].error`` when no call failed) keeps its real type instead of ``null``. ``row`` and
``result`` are the dataset's and the workflow's: their types come from the values.

Options (:class:`Selection`): ``status`` keeps one status; ``flatten_result`` writes
``result`` as one column per field (``result.revisions``; nested objects joined with dots,
lists kept as values; a record without a result object has none of them);
``order`` writes the records in the dataset's order (see :mod:`matrix_hpc.dataset_order`),
not in the store's (the order tasks finished).

Only current records are written, one per id: a failed record that a retry replaced is not
(:mod:`.latest`); the retry carries ``retry_of``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .textsafe import record_json
from .token_trace import expand
from .zarr_store import StoreReader

__all__ = ["ExportResult", "Selection", "export_store", "flatten_result", "known_types"]

log = logging.getLogger(__name__)

ROW_GROUP = 2048  # records per Parquet row group: what export holds in memory at once
_FIRST = ("id", "status", "error_kind", "prompt_tokens", "completion_tokens")  # flat, handy columns first
_ORDER_CACHE_CHUNKS = 32  # record chunks kept while reading in dataset order (the order tasks finished is near it)


@dataclass(frozen=True)
class Selection:
    """Which records an export writes, and how (see the module's docstring)."""

    status: str | None = None
    flatten_result: bool = False
    order: Mapping[str, int] | None = None
    """Each id's position in the dataset; records are written by it, ids it lacks last (in store order)."""


@dataclass
class ExportResult:
    records: int
    json_columns: list[str] = field(default_factory=list)
    """Parquet columns written as JSON text because their values do not fit one Arrow type."""
    unplaced: int = 0
    """With ``Selection.order``: records whose id the dataset does not hold (written last)."""


def export_store(
    root: str | Path, to: str | Path, fmt: Literal["jsonl", "parquet"] = "jsonl", status: str | None = None, sel: Selection | None = None
) -> ExportResult:
    """Write every committed record (optionally only ``status``; ``sel``: the other options) to ``to``."""
    reader = StoreReader(root)
    sel = sel or Selection(status)
    to = Path(to)
    to.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        n = 0
        with open(to, "w", encoding="utf-8") as fh:  # UTF-8 whatever the locale says
            for rec in _records(reader, sel):
                fh.write(record_json(rec) + "\n")  # stored records encode; this makes sure
                n += 1
        return ExportResult(n, unplaced=unplaced(reader, sel))
    if fmt == "parquet":
        res = _write_parquet(reader, to, sel)
        res.unplaced = unplaced(reader, sel)
        return res
    raise ValueError(f"unknown export format {fmt!r} (expected jsonl or parquet)")


def _records(reader: StoreReader, sel: Selection, arrays: bool = False) -> Iterator[dict[str, Any]]:
    """The selected records; turns' packed ``tokens`` decoded into lists (``arrays``: numpy arrays,
    which keep their int32/float32 in Arrow)."""
    recs = reader.iter_records() if sel.order is None else _in_order(reader, sel.order)
    for rec in recs:
        if sel.status is None or rec["status"] == sel.status:
            _expand_tokens(rec, arrays)
            yield flatten_result(rec) if sel.flatten_result else rec


def _expand_tokens(rec: dict[str, Any], arrays: bool) -> None:
    turns = rec.get("turns")
    if isinstance(turns, list):
        for t in turns:
            if isinstance(t, dict) and t.get("tokens") is not None:
                t["tokens"] = expand(t["tokens"], arrays)


def _locations(reader: StoreReader, order: Mapping[str, int]) -> tuple[list[Any], Any, Any]:
    """(each part's record array, and its committed rows), then the part and row of each record
    in dataset order, and which of them the dataset does not hold."""
    import numpy as np

    arrays, parts, rows, keys = [], [], [], []
    unknown = len(order)  # ids the dataset lacks sort after every position, in store order
    for pi, path in enumerate(reader.parts):
        group, n = reader._part(path)
        arrays.append((group["record"], n))
        current = reader.current(path, group, n)  # a record a retry replaced is not exported
        at = np.arange(n) if current is None else np.flatnonzero(current)
        ids = group["id"][:n][at].tolist() if n else []
        key = np.fromiter((order.get(rid, -1) for rid in ids), np.int64, len(ids))
        missing = key < 0
        key[missing] = unknown + np.arange(int(missing.sum()))
        unknown += int(missing.sum())
        parts.append(np.full(len(ids), pi, np.int32))
        rows.append(at)
        keys.append(key)
    if not keys:
        return arrays, np.zeros((0, 2), np.int64), np.zeros(0, bool)
    key = np.concatenate(keys)
    at = np.argsort(key, kind="stable")
    locs = np.stack([np.concatenate(parts)[at], np.concatenate(rows)[at]], axis=1)
    return arrays, locs, key[at] >= len(order)


def _in_order(reader: StoreReader, order: Mapping[str, int]) -> Iterator[dict[str, Any]]:
    """Committed records by their ids' positions in ``order``: each chunk of the store is read
    whole and kept while the next records need it (tasks finish near their dataset order)."""
    from collections import OrderedDict

    arrays, locs, _ = _locations(reader, order)
    cache: OrderedDict[tuple[int, int], list[str]] = OrderedDict()
    for pi, row in locs.tolist():
        arr, n = arrays[pi]
        cr = arr.chunks[0]
        k = row // cr
        texts = cache.get((pi, k))
        if texts is None:
            texts = cache[(pi, k)] = arr[k * cr : min(n, (k + 1) * cr)].tolist()
            if len(cache) > _ORDER_CACHE_CHUNKS:
                cache.popitem(last=False)
        else:
            cache.move_to_end((pi, k))
        yield json.loads(texts[row - k * cr])


def unplaced(reader: StoreReader, sel: Selection) -> int:
    """How many committed records (of any status) have an id the dataset order lacks (0 without an order)."""
    return 0 if sel.order is None else int(_locations(reader, sel.order)[2].sum())


def flatten_result(rec: dict[str, Any]) -> dict[str, Any]:
    """``rec`` with ``result`` (an object) as ``result.FIELD`` keys, nested objects joined with dots."""
    result = rec.get("result")
    if not isinstance(result, dict):
        return {k: v for k, v in rec.items() if k != "result" or v is not None}
    out: dict[str, Any] = {}
    for k, v in rec.items():
        if k == "result":
            _flatten("result", result, out)
        else:
            out[k] = v
    return out


def _flatten(prefix: str, obj: dict[str, Any], out: dict[str, Any]) -> None:
    for k, v in obj.items():
        name = f"{prefix}.{k}"
        if isinstance(v, dict) and v:
            _flatten(name, v, out)
        else:
            out[name] = v


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
    reader: StoreReader, sel: Selection, extra: Callable[[dict[str, Any]], dict[str, Any]] | None = None, size: int = ROW_GROUP
) -> Iterator[list[dict[str, Any]]]:
    """Flat records in row groups; ``extra(record)``: more columns for each (the hf export's messages)."""
    batch: list[dict[str, Any]] = []
    for rec in _records(reader, sel, arrays=True):
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


def known_types() -> dict[str, Any]:
    """The Arrow type of each column the runtime writes into every record (``Task.to_record``
    and :mod:`.textsafe`'s ``text_replaced``; ``_flat``'s handy columns): a column whose values
    are all null still gets its type. Fields the values add (``usage.by_role``) are merged in."""
    import pyarrow as pa

    s, i, f = pa.string(), pa.int64(), pa.float64()
    ids, lps = pa.list_(pa.int32()), pa.list_(pa.float32())
    tokens = pa.struct([("prompt_ids", ids), ("ids", ids), ("logprobs", lps), ("top_ids", pa.list_(ids)), ("top_logprobs", pa.list_(lps))])
    turn = pa.struct(
        [("role", s), ("text", s), ("prompt_tokens", i), ("completion_tokens", i), ("started_at", f), ("latency_s", f), ("endpoint", s),
         ("model", s), ("served_model", s), ("max_tokens", i), ("temperature", f), ("error", s), ("replayed", pa.bool_()), ("tokens", tokens)]
    )  # fmt: skip
    return {
        "id": s, "status": s, "error_kind": s, "prompt_tokens": i, "completion_tokens": i,
        "error": pa.struct([("kind", s), ("message", s), ("role", s), ("traceback", pa.list_(s))]),
        "turns": pa.list_(turn),
        "usage": pa.struct([("prompt_tokens", i), ("completion_tokens", i)]),
        "attempt": i, "hops": i, "created_at": f, "finished_at": f,
        "text_replaced": pa.struct([("count", i), ("at", pa.list_(s))]),
        "retry_of": pa.struct([("row", i), ("error_kind", s), ("records", i)]),
    }  # fmt: skip


def _infer_types(batches: Callable[[], Iterator[list[dict[str, Any]]]], json_cols: set[str]) -> tuple[list[str], dict[str, Any]]:
    """First pass: every column's name, in order, and one Arrow type all its values fit
    (starting from :func:`known_types`: a record column no value fills keeps its type)."""
    import pyarrow as pa

    names: dict[str, None] = dict.fromkeys(_FIRST)
    types: dict[str, Any] = {k: v for k, v in known_types().items() if k not in json_cols}
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


def _write_parquet(reader: StoreReader, to: Path, sel: Selection) -> ExportResult:
    import pyarrow as pa
    import pyarrow.parquet as pq

    json_cols: set[str] = set()
    while True:  # a column that fails to convert in the second pass is retried as JSON text
        names, types = _infer_types(lambda: _batches(reader, sel), json_cols)
        schema = pa.schema([(n, pa.string() if n in json_cols else types.get(n, pa.null())) for n in names])
        tmp = to.with_name(f".{to.name}.partial")
        n = 0
        try:
            with pq.ParquetWriter(tmp, schema) as writer:
                for batch in _batches(reader, sel):
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
