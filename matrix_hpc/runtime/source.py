"""The source: dataset rows → tasks, with stable ids and bad rows as failed tasks.

Bad input is data, not a crash: a malformed JSONL line, a row that is not an
object, a missing required field, an over-long or too deeply nested row, an
unreadable Parquet cell or row group, or a repeated id each become a task that is
already failed with a reason naming the line (``line 7: ...``, ``row 7: ...`` for
Parquet) and the id; it goes to the store like any other result. Every non-blank
line, and every Parquet row, ends as exactly one task.

What a row may hold, as scrapers write it (README: Dataset rows):

* JSONL is read as bytes and each line decoded as UTF-8 with ``surrogateescape``,
  so invalid bytes do not fail the row: they travel as U+DC80..U+DCFF, and the
  record encoder replaces them (:mod:`matrix_hpc.store.textsafe`). A Parquet string
  cell holding invalid UTF-8 is read the same way.
* A BOM at the start of a line is dropped (the first line, or files joined with
  ``cat``); CRLF endings are dropped; raw control characters inside strings are
  taken as the characters they are (Python's ``strict=False``): the record
  re-encodes them as escapes, so the output is valid JSON.
* ``NaN``/``Infinity`` (Python's JSON, not RFC 8259) stay floats, as they are in
  Parquet: the row is kept as written.
* Ids: a string, an int, or an integral float (pandas' int column with a gap) as
  its int; a row whose id is missing, null, empty, a bool or another type gets a
  hash of its content. Bytes UTF-8 cannot encode are written ``\\xe9`` (``\\ud83d``
  for a lone surrogate) in the id, so the id the store keeps is the id resume
  compares.
"""

from __future__ import annotations

import json
import logging
import math
from array import array
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..store.idhash import MARK, hash_ids, id_hash
from .shards import DatasetError, Shard, resolve_shards
from .task import Task, content_id

__all__ = ["DatasetError", "DatasetScan", "MAX_DEPTH", "SourceOptions", "iter_tasks", "count_rows", "scan_dataset"]

log = logging.getLogger(__name__)

_PREVIEW = 500  # characters of a bad row kept in its record
MAX_DEPTH = 100
"""Rows nested deeper fail (``bad_input``): Parquet readers refuse deeper schemas by
default, and the runtime's pickling of a task fails at ~500 levels."""
_HOLD_MAX = 1 << 24
"""A JSONL line longer than this (or ``max_row_bytes``, if larger) is counted, not held
in memory or parsed: it fails as over-long without its id (a content hash of its start)."""
_BOM = b"\xef\xbb\xbf"


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
    split: str | None = None
    columns: tuple[tuple[str, str], ...] | None = None
    """(column read, field of the row) pairs: only these columns, renamed; ``None``: all."""
    raw_path: str | None = None
    """``dataset.path`` as written (a Hugging Face dataset name is not a path)."""

    def shards(self) -> list[Shard]:
        return resolve_shards(self.path, self.format, self.split, self.raw_path)


def columns_option(columns: list[str] | dict[str, str] | None) -> tuple[tuple[str, str], ...] | None:
    """``dataset.columns`` (a list keeps columns, a mapping keeps and renames them) as pairs."""
    if columns is None:
        return None
    if isinstance(columns, dict):
        return tuple((str(k), str(v)) for k, v in columns.items())
    return tuple((c, c) for c in columns)


def _read_columns(opts: SourceOptions, names: list[str], shard: Shard) -> list[str] | None:
    """The columns to read from a columnar shard (the id column too, so ids stay stable)."""
    if opts.columns is None:
        return None
    wanted = [src for src, _ in opts.columns]
    missing = [c for c in wanted if c not in names]
    if missing:
        raise DatasetError(f"dataset.columns: no column {missing[0]!r} in {shard.label} (it has {', '.join(names)})")
    if opts.id_field is not None and opts.id_field in names and opts.id_field not in wanted:
        wanted.append(opts.id_field)
    return wanted


def _project(opts: SourceOptions, row: dict[str, Any]) -> dict[str, Any]:
    if opts.columns is None:
        return row
    out = {dst: row[src] for src, dst in opts.columns if src in row}
    if opts.id_field is not None and opts.id_field in row and opts.id_field not in out:
        out[opts.id_field] = row[opts.id_field]
    return out


@dataclass(frozen=True, slots=True)
class _Unread:
    """A row the source could not read whole: a JSONL line too long to hold, or a
    Parquet row with a cell (or a row group) that cannot be read."""

    row: dict[str, Any]
    """What could be read, kept in its record."""
    reason: str
    key: str
    """Stable content for its id when ``row`` has none."""


def _jsonl_lines(opts: SourceOptions, path: Path) -> Iterator[tuple[int, bytes | _Unread]]:
    """(line number, line without its ending or BOM) for each non-blank line; a line too
    long to hold (:data:`_HOLD_MAX`) comes as :class:`_Unread`. ``scan_dataset`` and the
    tasks both count lines here, so the run's total is what the source yields."""
    hold_max = max(_HOLD_MAX, opts.max_row_bytes)
    with open(path, "rb") as fh:
        lineno = 0
        while line := fh.readline(hold_max + 1):
            lineno += 1
            if len(line) > hold_max and not line.endswith(b"\n"):
                head, size = line[:_PREVIEW], len(line)
                while more := fh.readline(1 << 20):  # skip the rest, holding 1 MiB at most
                    size += len(more)
                    if more.endswith(b"\n"):
                        size -= 1
                        break
                preview = head.decode("utf-8", "replace")
                reason = f"line is {size} bytes, over dataset.max_row_bytes={opts.max_row_bytes}"
                yield lineno, _Unread({"_raw": preview, "_bytes": size}, reason, f"{size}:{preview}")
                continue
            line = line.rstrip(b"\r\n")
            if line.startswith(_BOM):  # a BOM opens a file, or a file joined with cat
                line = line[len(_BOM) :]
            if line.strip():
                yield lineno, line


@dataclass(frozen=True)
class DatasetScan:
    rows: int
    """Rows the source will yield (non-blank lines for JSONL), honouring ``limit``."""
    missing_id: int
    """Rows without ``id_field`` (they get a content hash as their id)."""
    ids: RowIds | None = None
    """Each row's id as a hash (``scan_dataset(opts, ids=True)``), for :func:`iter_tasks`."""


@dataclass(frozen=True, eq=False)
class RowIds:
    """Every row's task id as its 64-bit hash (:func:`~matrix_hpc.store.idhash.id_hash`), in
    the order the source yields the rows: 8 bytes a row, what lets :func:`iter_tasks` find a
    repeated id without holding the ids it has seen."""

    hashes: np.ndarray
    """uint64, one per row."""
    repeated: frozenset[int]
    """Hashes more than one row has: a repeated id, or (odds n²/2⁶⁵) two ids with one hash.
    Only rows with one of these are compared as text while streaming."""

    @classmethod
    def of(cls, hashes: np.ndarray) -> RowIds:
        ordered = np.sort(hashes)  # a copy while this runs: with ``same``, 9 bytes a row on top of the hashes
        same = ordered[1:] == ordered[:-1]
        repeated = frozenset(np.unique(ordered[1:][same]).tolist())
        del ordered
        return cls(hashes, repeated)


def _parquet(path: Path) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # not Parquet, truncated, a schema too deep for the reader: the file as a whole
        raise DatasetError(f"dataset.path: cannot read {path} as Parquet ({type(exc).__name__}: {exc})") from None


def scan_dataset(opts: SourceOptions, ids: bool = False) -> DatasetScan:
    """Count the rows, and those that lack ``id_field``, in one pass before the run; with
    ``ids``, also every row's task id as a hash (:class:`RowIds`, 8 bytes a row).

    For JSONL a line lacks the field when its text does not contain ``"FIELD"`` (cheap,
    no JSON parsing; a nested key of that name can only make the count too low). A
    columnar shard reads its id column only (Parquet's row count is in its footer).

    The ids: a columnar shard whose id column holds plain ids (non-empty strings, ints)
    hashes that column; any other shard (JSONL, ids missing or of other types, an
    unreadable id column) is read row by row as :func:`iter_tasks` reads it, so the hash
    is of the id the task will have (for JSONL that parses every line once more).
    """
    limit = opts.limit if opts.limit is not None else float("inf")
    n = missing = 0
    hashes: list[np.ndarray] = []
    for shard in opts.shards():
        if n >= limit:
            break
        rows, miss, got = _scan_shard(opts, shard, limit - n, ids)
        n += rows
        missing += miss
        if got is not None:
            hashes.append(got)
        del got
    row_ids = None
    if ids:
        every = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
        hashes.clear()  # the shards' arrays go before the sorted copy comes: 17 bytes a row at the peak
        row_ids = RowIds.of(every)
    return DatasetScan(rows=int(n), missing_id=int(missing), ids=row_ids)


def _scan_shard(opts: SourceOptions, shard: Shard, limit: float, ids: bool) -> tuple[int, int, np.ndarray | None]:
    n = missing = 0
    if shard.format == "jsonl":
        needle = json.dumps(opts.id_field).encode() if opts.id_field is not None else None
        got = array("Q")
        for lineno, line in _jsonl_lines(opts, shard.path):
            if n >= limit:
                break
            n += 1
            missing += needle is not None and (isinstance(line, _Unread) or needle not in line)
            if ids:
                got.append(id_hash(_to_task(opts, f"line {lineno}", line).id))
        return n, missing, np.frombuffer(got, np.uint64) if ids else None
    if shard.format == "parquet":
        pf = _parquet(shard.path)
        names = pf.schema_arrow.names
        _read_columns(opts, names, shard)  # a missing column fails here, before the run
        n = int(min(pf.metadata.num_rows, limit))
        batches = lambda: pf.iter_batches(batch_size=65536, columns=[opts.id_field])  # noqa: E731
    else:
        reader = _arrow_reader(shard)
        names = reader.schema.names
        _read_columns(opts, names, shard)
        n = int(min(_arrow_rows(shard), limit))
        batches = lambda: (b.select([opts.id_field]) for b in _arrow_reader(shard))  # noqa: E731
    if opts.id_field is None or opts.id_field not in names:
        return n, n if opts.id_field is not None else 0, _hash_rows(opts, shard, n) if ids else None
    seen = 0
    got_ids: list[np.ndarray] | None = [] if ids else None
    try:
        for batch in batches():
            col = batch.column(0)[: max(0, n - seen)]
            missing += col.null_count
            seen += len(col)
            if got_ids is not None:
                plain = _hash_plain_ids(col)
                if plain is None:  # an id the column alone cannot give: read the rows
                    got_ids = None
                else:
                    got_ids.append(plain)
            if seen >= n:
                break
    except Exception as exc:  # an unreadable row group: its rows fail in the run, one by one
        log.warning("%s: cannot read column %r past row %d (%s)", shard.path, opts.id_field, seen, exc)
        got_ids = None
    if not ids:
        return n, missing, None
    if got_ids is None or seen < n:
        return n, missing, _hash_rows(opts, shard, n)
    return n, missing, np.concatenate(got_ids) if got_ids else np.zeros(0, np.uint64)


def _hash_plain_ids(col: Any) -> np.ndarray | None:
    """The ids' hashes when every cell of the id column is one the row would take as is
    (a non-empty valid UTF-8 string, an int); None otherwise."""
    import pyarrow as pa

    t = col.type
    if col.null_count:
        return None
    if pa.types.is_integer(t):
        return hash_ids(map(str, col.to_pylist()), len(col))
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        return None
    try:
        col.validate(full=True)  # invalid UTF-8 (Parquet does not check it): the row path decodes it
    except Exception:
        return None
    values = col.to_pylist()
    if not all(values):
        return None
    return hash_ids(map(_safe_id, values), len(values))


def _hash_rows(opts: SourceOptions, shard: Shard, n: int) -> np.ndarray:
    """The hashes of the shard's first ``n`` task ids, read row by row as the run reads them."""
    got = array("Q")
    for i, (where, raw) in enumerate(_shard_rows(opts, shard)):
        if i >= n:
            break
        got.append(id_hash(_to_task(opts, where, _project(opts, raw) if isinstance(raw, dict) else raw).id))
    return np.frombuffer(got, np.uint64)


def _arrow_reader(shard: Shard) -> Any:
    """A batch reader over an Arrow file ``datasets`` wrote (IPC stream), memory-mapped."""
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(pa.memory_map(str(shard.path)))
    except Exception as exc:
        raise DatasetError(f"dataset.path: cannot read {shard.path} as Arrow ({type(exc).__name__}: {exc})") from None


def _arrow_rows(shard: Shard) -> int:
    return sum(b.num_rows for b in _arrow_reader(shard))  # memory-mapped: no row is copied


def count_rows(opts: SourceOptions) -> int:
    """Rows the source will yield (non-blank lines for JSONL), honouring ``limit``."""
    return scan_dataset(opts).rows


_AS_BINARY = {"string": "binary", "large_string": "large_binary", "string_view": "binary_view"}


def _parquet_rows(batch: Any) -> list[dict[str, Any] | _Unread]:
    """The batch's rows as dicts. A cell that does not convert (a string of invalid
    UTF-8, a timestamp out of Python's range) is found cell by cell: a string is
    decoded with ``surrogateescape`` (as JSONL is), anything else fails its row."""
    try:
        return batch.to_pylist()
    except Exception:
        pass
    import pyarrow as pa

    out: list[dict[str, Any] | _Unread] = []
    names = batch.schema.names
    for i in range(batch.num_rows):
        row: dict[str, Any] = {}
        bad: list[str] = []
        for name, col in zip(names, batch.columns):
            try:
                row[name] = col[i].as_py()
                continue
            except Exception as exc:
                error = exc
            binary = _AS_BINARY.get(str(col.type))
            if binary is not None:
                raw = col.view(getattr(pa, binary)())[i].as_py()
                row[name] = raw.decode("utf-8", "surrogateescape")
            else:
                bad.append(f"column {name!r} ({type(error).__name__}: {error})")
        if bad:
            key = json.dumps(row, sort_keys=True, default=str)
            out.append(_Unread(row, "cannot read " + ", ".join(bad), key))
        else:
            out.append(row)
    return out


def _raw_rows(opts: SourceOptions) -> Iterator[tuple[str, bytes | dict[str, Any] | _Unread]]:
    """(where, raw line or row) for each row, ``where`` naming it for errors: ``line 7``
    (``row 7`` for a columnar file) for one file, ``SHARD line 7`` for several."""
    shards = opts.shards()
    for shard in shards:
        prefix = f"{shard.label} " if len(shards) > 1 else ""
        for where, raw in _shard_rows(opts, shard):
            if isinstance(raw, dict):
                raw = _project(opts, raw)
            yield prefix + where, raw


def _shard_rows(opts: SourceOptions, shard: Shard) -> Iterator[tuple[str, bytes | dict[str, Any] | _Unread]]:
    if shard.format == "jsonl":
        for lineno, line in _jsonl_lines(opts, shard.path):
            yield f"line {lineno}", line
        return
    if shard.format == "arrow":
        reader = _arrow_reader(shard)
        columns = _read_columns(opts, reader.schema.names, shard)
        n = 0
        for big in reader:
            big = big.select(columns) if columns is not None else big
            for start in range(0, big.num_rows, 1024):  # a batch of datasets' can be large: convert 1024 rows at a time
                for row in _parquet_rows(big.slice(start, 1024)):
                    n += 1
                    yield f"row {n}", row
        return
    pf = _parquet(shard.path)
    columns = _read_columns(opts, pf.schema_arrow.names, shard)
    n = 0
    for group in range(pf.metadata.num_row_groups):
        size, got = pf.metadata.row_group(group).num_rows, 0
        try:
            for batch in pf.iter_batches(batch_size=1024, row_groups=[group], columns=columns):
                for row in _parquet_rows(batch):
                    n, got = n + 1, got + 1
                    yield f"row {n}", row
        except Exception as exc:  # a corrupt page: each row not read yet fails alone
            reason = f"unreadable row group {group} ({type(exc).__name__}: {exc})"[:_PREVIEW]
            log.warning("%s: %s; its %d row(s) are recorded as failed", shard.path, reason, size - got)
            for _ in range(size - got):
                n += 1
                yield f"row {n}", _Unread({}, reason, f"{shard.path.name} row {n}")


def _failed(tid: str, where: str, row: dict[str, Any], kind: str, message: str) -> Task:
    task = Task(id=tid, row=row, next_role=None)
    task.fail(kind, f"{where}: {message}", role="source")
    return task


def _safe_id(text: str) -> str:
    """``text`` as an id UTF-8 can encode: an invalid byte (held as U+DC80..U+DCFF) is
    written ``\\xe9``, a lone surrogate ``\\ud83d``. The same text always gives the same id,
    and the store keeps it as it is, so a resume finds it."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return "".join(c if not 0xD800 <= ord(c) <= 0xDFFF else f"\\x{ord(c) - 0xDC00:02x}" if ord(c) >= 0xDC80 else f"\\u{ord(c):04x}" for c in text)


def _row_id(opts: SourceOptions, row: dict[str, Any]) -> str | None:
    """The row's own id, or None (it gets a content hash)."""
    return _id_value(row.get(opts.id_field) if opts.id_field is not None else None)


def _id_value(rid: Any) -> str | None:
    """An id cell's value as the id, or None (the row gets a content hash)."""
    if isinstance(rid, bool):
        return None
    if isinstance(rid, str):
        return _safe_id(rid) if rid else None
    if isinstance(rid, int):
        return str(rid)
    if isinstance(rid, float) and math.isfinite(rid):
        return str(int(rid)) if rid.is_integer() else repr(rid)
    return None


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean", type(None): "null"}


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests more than ``limit`` levels (an object is 1), found without recursion."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if d > limit:
            return True
        children = v.values() if isinstance(v, dict) else v
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list, tuple)))
    return False


def _to_task(opts: SourceOptions, where: str, raw: bytes | dict[str, Any] | _Unread) -> Task:
    if isinstance(raw, _Unread):
        return _failed(_row_id(opts, raw.row) or content_id(raw.key), where, raw.row, "bad_input", raw.reason)
    if isinstance(raw, bytes):
        size = len(raw)
        try:
            # Invalid bytes travel as surrogate escapes (module docstring); strict=False:
            # a raw tab or NUL inside a string is that character.
            row = json.loads(raw.decode("utf-8", "surrogateescape"), strict=False)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than json can parse
            text = raw.decode("utf-8", "replace")  # a preview of bytes that are not a row
            reason = f"nested too deep to parse (more than {MAX_DEPTH} levels)" if isinstance(exc, RecursionError) else f"invalid JSON ({exc})"
            return _failed(content_id(raw), where, {"_raw": text[:_PREVIEW]}, "bad_input", reason)
        brackets = raw.count(b"[") + raw.count(b"{")
        if opts.columns is not None and isinstance(row, dict):  # the row is what is kept of the line
            row = _project(opts, row)
            text = json.dumps(row, ensure_ascii=False, default=str)
            size = len(text.encode("utf-8", "surrogatepass"))
            brackets = text.count("[") + text.count("{")
    else:
        row = raw
        text = json.dumps(row, ensure_ascii=False, default=str)
        size = len(text.encode("utf-8", "surrogatepass"))
        brackets = text.count("[") + text.count("{")
    if not isinstance(row, dict):
        dumped = json.dumps(row, default=str)
        return _failed(
            content_id(dumped), where, {"_raw": dumped[:_PREVIEW]}, "bad_input", f"expected a JSON object, got {_JSON_TYPES.get(type(row), type(row).__name__)}"
        )
    tid = _row_id(opts, row) or content_id(json.dumps(row, sort_keys=True, default=str))
    if size > opts.max_row_bytes:
        preview = {"_raw": json.dumps(row, default=str)[:_PREVIEW], "_bytes": size}
        return _failed(tid, where, preview, "bad_input", f"row {tid} is {size} bytes, over dataset.max_row_bytes={opts.max_row_bytes}")
    if brackets > MAX_DEPTH and _deeper_than(row, MAX_DEPTH):  # only a row with that many brackets can be
        preview = {"_raw": json.dumps(row, default=str)[:_PREVIEW]}
        return _failed(tid, where, preview, "bad_input", f"row {tid} is nested more than {MAX_DEPTH} levels deep")
    missing = [f for f in opts.required_fields if row.get(f) in (None, "")]
    if missing:
        return _failed(tid, where, row, "bad_input", f"row {tid} is missing required field {missing[0]!r}")
    return Task(id=tid, row=row, next_role=opts.entry_role)


class _RepeatIndex:
    """Which earlier row has a task's id, for :func:`iter_tasks`, without holding every id.

    The scan gave each row's id hash (:class:`RowIds`). A row whose id hash no other row
    has, and that the scan saw with that same hash, has an id no earlier row has: nothing
    is kept for it. The ids kept as text (id -> where its first row is) are the few that
    need it: those whose hash another row has (a repeated id), those holding ``#dup@`` (the
    ids made for repeats below, which a row's own id may equal), and those of rows the run
    read otherwise than the scan (a row group that failed only now; a file changed since).
    """

    def __init__(self, opts: SourceOptions, ids: RowIds) -> None:
        self._opts, self._hashes, self._repeated = opts, ids.hashes, ids.repeated
        self._held: dict[str, int] = {}
        self._odd: set[int] = set()
        """Hashes of ids of rows the run read otherwise than the scan."""
        self._order: np.ndarray | None = None
        """The scan's hashes in sorted order (argsort), made at the first such row."""

    def first(self, n: int, tid: str) -> int | str | None:
        """Where an earlier row with id ``tid`` is (packed, or a ``where`` text), for row ``n``."""
        h = id_hash(tid)
        as_scanned = n < len(self._hashes) and self._hashes.item(n) == h
        if as_scanned and h not in self._repeated and h not in self._odd and MARK not in tid:
            return None
        found = self._held.get(tid)
        if found is None and not as_scanned:
            return self._scanned_before(n, h)
        return found

    def _scanned_before(self, n: int, h: int) -> str | None:
        """The first row before ``n`` the scan saw with hash ``h`` (a row read otherwise only)."""
        if self._order is None:
            self._order = np.argsort(self._hashes, kind="stable")
        ordered = self._hashes[self._order]
        lo, hi = np.searchsorted(ordered, np.uint64(h), "left"), np.searchsorted(ordered, np.uint64(h), "right")
        before = [int(j) for j in self._order[lo:hi] if j < n]
        if not before:
            return None
        return next(where for j, (where, _) in enumerate(_raw_rows(self._opts)) if j == min(before))

    def add(self, n: int, tid: str, where: int) -> None:
        """Row ``n``'s task has ``tid`` (its own id, or one made for a repeat): keep it if needed."""
        h = id_hash(tid)
        as_scanned = n < len(self._hashes) and self._hashes.item(n) == h
        if not as_scanned and MARK not in tid:
            self._odd.add(h)
        if not as_scanned or h in self._repeated or h in self._odd or MARK in tid:
            self._held[tid] = where

    def __contains__(self, tid: str) -> bool:
        """Whether an id made for a repeat is taken (every id holding ``#dup@`` is held)."""
        return tid in self._held


def iter_tasks(
    opts: SourceOptions,
    done: Container[str] | None = None,
    counts: dict[str, int] | None = None,
    retry: dict[str, dict[str, Any]] | None = None,
    scan: DatasetScan | None = None,
) -> Iterator[Task]:
    """Tasks for every row not in ``done``; bad rows come out already failed.

    ``counts["skipped"]`` is kept up to date with the rows skipped as done. A task whose id
    is in ``retry`` (failed records run again) carries its ``retry_of``: its record replaces
    that failed one (see :mod:`matrix_hpc.store.latest`). ``scan``: the start-up's
    ``scan_dataset(opts, ids=True)`` (made here when not given): a repeated id is found from
    its hashes, so the source holds no id per row.
    """
    retry = retry or {}
    done = done if done is not None else frozenset()
    counts = counts if counts is not None else {}
    counts.setdefault("skipped", 0)
    ids = scan.ids if scan is not None and scan.ids is not None else scan_dataset(opts, ids=True).ids
    assert ids is not None
    seen = _RepeatIndex(opts, ids)
    # Where a kept id's first row is ("line 7" keeps 7), as an int: with several shards
    # the int also says which: (index of "SHARD line") << 40 | 7.
    heads: dict[str, int] = {}
    head_of: list[str] = []
    for n, (where, raw) in enumerate(_raw_rows(opts)):
        if opts.limit is not None and n >= opts.limit:
            return
        task = _to_task(opts, where, raw)
        head, _, num = where.rpartition(" ")
        if head not in heads:
            heads[head] = len(head_of)
            head_of.append(head)
        first_at = seen.first(n, task.id)
        if first_at is not None:
            first = first_at if isinstance(first_at, str) else f"{head_of[first_at >> 40]} {first_at & ((1 << 40) - 1)}"
            # Keep the row, under an id of its own, so nothing is silently dropped; a row
            # already failed keeps its own reason first.
            tid = f"{task.id}#dup@{where.replace(' ', '')}"
            while tid in seen:  # a row's own id may look like one made here
                tid += "+"
            note = f"duplicate id {task.id!r} (first at {first})"
            if task.error is not None:
                task = _failed(tid, where, task.row, task.error.kind, f"{task.error.message.removeprefix(where + ': ')}; {note}")
            else:
                task = _failed(tid, where, task.row, "bad_input", note)
        seen.add(n, task.id, heads[head] << 40 | int(num))
        if task.id in done:
            counts["skipped"] += 1
        else:
            if task.id in retry:
                task.retry_of = retry[task.id]
            yield task
