"""The viewer's index of a store: small columns of every committed record, kept current.

Only committed rows are read (``part-*/commit.json``), with plain file reads: the
viewer takes no lock and writes nothing, so it never blocks or slows the writer.
:meth:`StoreIndex.refresh` reads the rows committed since the last call; per record
it keeps a status code, a failure-kind code, ``finished_at`` and the two token counts
(~27 bytes). :meth:`StoreIndex.facet_step` reads the ``record`` JSON of the next rows
in the background (see :mod:`.facets`). Nothing here is thread safe: the server calls
it from one worker thread.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..store.fsutil import read_json
from ..store.latest import REPLACES
from ..store.layout import PartLayout, RunLayout
from .chunks import Column
from .facets import Aggregates, FacetArrays, Vocab, record_names

__all__ = ["Codes", "Part", "StoreIndex"]

log = logging.getLogger(__name__)

_BLOCK_CHUNKS = 64  # chunks read per step when loading small columns: bounded transient memory
_RECORD_CACHE_ROWS = 8192  # decoded record chunks kept, in rows (a page touches one or two chunks)
_NUMERIC = {"finished_at": np.float64, "prompt_tokens": np.int64, "completion_tokens": np.int64}


def _join(arrays: list[np.ndarray]) -> np.ndarray:
    if len(arrays) == 1:
        return arrays[0]
    return np.concatenate(arrays) if arrays else np.zeros(0)


def _padded(values: np.ndarray, n: int) -> np.ndarray:
    """``values`` with zeros up to length ``n`` (numeric columns not loaded yet)."""
    if len(values) >= n:
        return values[:n]
    out = np.zeros(n, values.dtype)
    out[: len(values)] = values
    return out


class _CodeMap(dict):  # type: ignore[type-arg]
    """str -> code; a new string gets the next code (``__missing__``: no per-item branch in Python)."""

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.names = names

    def __missing__(self, key: str) -> int:
        code = self[key] = len(self.names)
        self.names.append(key)
        return code


class Codes:
    """A categorical column: strings to small integer codes, in order of first sight."""

    def __init__(self, dtype: type) -> None:
        self.dtype = dtype
        self.names: list[str] = []
        self._code = _CodeMap(self.names)

    def encode(self, values: np.ndarray) -> np.ndarray:
        return np.fromiter(map(self._code.__getitem__, values.tolist()), self.dtype, len(values))

    def code(self, name: str) -> int | None:
        return self._code.get(name)


class _Grow:
    """A growable 1-D numpy buffer (amortized doubling)."""

    def __init__(self, dtype: Any) -> None:
        self.buf = np.zeros(1024, dtype)
        self.n = 0

    def extend(self, values: np.ndarray) -> None:
        need = self.n + len(values)
        if need > len(self.buf):
            new = np.zeros(max(need, 2 * len(self.buf)), self.buf.dtype)
            new[: self.n] = self.buf[: self.n]
            self.buf = new
        self.buf[self.n : need] = values
        self.n = need

    @property
    def values(self) -> np.ndarray:
        return self.buf[: self.n]


@dataclass
class Part:
    """One ``part-NNN`` of the store and what is indexed of it."""

    name: str
    dir: Path
    n: int = 0
    """Rows indexed (all committed when the last refresh read them)."""
    n_num: int = 0
    """Rows whose numeric columns are loaded too (see :meth:`StoreIndex.load_numeric`)."""
    seen: int = 0
    """Rows committed when the last refresh looked."""
    cols: dict[str, _Grow] = field(default_factory=dict)
    facets: FacetArrays = field(default_factory=FacetArrays)
    _columns: dict[str, Column] = field(default_factory=dict)

    def column(self, name: str) -> Column:
        col = self._columns.get(name)
        if col is None:
            col = self._columns[name] = Column(PartLayout(self.dir).data / name)
        return col

    def committed(self) -> int:
        try:
            return int((read_json(PartLayout(self.dir).commit, {"rows": 0}) or {}).get("rows", 0))
        except (OSError, ValueError, TypeError):  # mid-replace on a file system without atomic rename: next time
            return self.n


class StoreIndex:
    """Small columns and facets of every committed record of the store at ``root``."""

    def __init__(self, root: Path, on_record: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.root = Path(root)
        self.parts: list[Part] = []
        self.status = Codes(np.int8)
        self.kind = Codes(np.int16)
        self.roles = Vocab()
        self.models = Vocab()
        self.aggregates = Aggregates()
        self.version = 0
        """Bumped whenever rows are added (caches of derived arrays key on it, with ``generation``)."""
        self.generation = 0
        """Bumped when the store was replaced and everything is read again."""
        self._on_record = on_record
        self._records: OrderedDict[tuple[int, int], tuple[np.ndarray, int]] = OrderedDict()
        self._concat: tuple[tuple[int, int], dict[str, np.ndarray]] | None = None
        self._stamp: Any = None
        """store.json's creation time when the index was started (a store made again has another)."""

    # -- loading --------------------------------------------------------------

    def _store_stamp(self) -> Any:
        try:
            return (read_json(RunLayout(self.root).store_json, {}) or {}).get("created_at")
        except (OSError, ValueError):
            return self._stamp

    def refresh(self, max_rows: int | None = None) -> int:
        """Index rows committed since the last call, at most ``max_rows`` of them (the server
        calls it in steps, so a query need not wait for a million rows); how many were added.
        :attr:`caught_up` says whether every row committed at this call is indexed."""
        stamp = self._store_stamp()
        if self._stamp is not None and stamp != self._stamp:  # deleted and made again: nothing read holds
            log.warning("%s was made again (store.json changed); reading it from the start", self.root)
            self._reset()
        self._stamp = stamp
        known = {p.name for p in self.parts}
        for d in RunLayout(self.root).parts():
            if d.name not in known and d.has_data:
                self.parts.append(Part(d.name, d.dir))
        self.parts.sort(key=lambda p: p.name)
        added = 0
        budget = max_rows if max_rows is not None else 1 << 62
        for part in self.parts:
            rows = part.committed()
            if rows < part.n:  # the store was replaced under us: start this part again
                log.warning("%s: %d committed rows, %d indexed: the part was rewritten; indexing it again", part.dir, rows, part.n)
                self._reset()
                return self.refresh(max_rows)
            part.seen = rows
            take = min(rows, part.n + max(budget, 0))
            if take > part.n:
                n = self._load(part, take)
                added += n
                budget -= n
                part.facets.reserve(part.n)
        if added:
            self.version += 1
        return added

    @property
    def caught_up(self) -> bool:
        """Every row committed when :meth:`refresh` last looked is indexed."""
        return all(p.n >= p.seen for p in self.parts)

    @property
    def committed_total(self) -> int:
        """Rows committed when :meth:`refresh` last looked (indexed or not yet)."""
        return sum(max(p.seen, p.n) for p in self.parts)

    def _reset(self) -> None:
        """Forget everything read (the store was replaced)."""
        generation = self.generation + 1
        self.__init__(self.root, self._on_record)  # type: ignore[misc]
        self.generation = generation

    def _load(self, part: Part, rows: int) -> int:
        """Status and failure kind of rows ``[part.n, rows)``: what counts and the first page need."""
        if not part.cols:
            part.cols = {"status": _Grow(np.int8), "kind": _Grow(np.int16), "replaced": _Grow(np.bool_), **{k: _Grow(t) for k, t in _NUMERIC.items()}}
        step = part.column("status").chunk_rows * _BLOCK_CHUNKS
        start = part.n
        retries = (PartLayout(part.dir).data / REPLACES).exists()  # a store older than retries has none
        for lo in range(start, rows, step):
            hi = min(rows, lo + step)
            part.cols["status"].extend(self.status.encode(part.column("status").read(lo, hi)))
            part.cols["kind"].extend(self.kind.encode(part.column("error_kind").read(lo, hi)))
            part.cols["replaced"].extend(np.zeros(hi - lo, np.bool_))
            if retries:  # a retry's row names the earlier row it replaces (store.latest's rule)
                old = part.column(REPLACES).read(lo, hi).astype(np.int64)
                part.cols["replaced"].buf[old[(old >= 0) & (old < hi)]] = True
            part.n = hi
        return rows - start

    @property
    def numeric_ready(self) -> bool:
        return all(p.n_num >= p.n for p in self.parts)

    def load_numeric(self, max_rows: int | None = None) -> int:
        """``finished_at`` and token counts of (up to ``max_rows`` of) the rows :meth:`refresh`
        added: a second step, so that a first page need not wait for them; how many were read."""
        done = 0
        budget = max_rows if max_rows is not None else 1 << 62
        for part in self.parts:
            if part.n_num >= part.n or budget <= 0:
                continue
            step = part.column("finished_at").chunk_rows * _BLOCK_CHUNKS
            start = part.n_num
            end = min(part.n, start + budget)
            for lo in range(start, end, step):
                hi = min(end, lo + step)
                for name, dtype in _NUMERIC.items():
                    part.cols[name].extend(part.column(name).read(lo, hi).astype(dtype))
                part.n_num = hi
            done += end - start
            budget -= end - start
        if done:
            self.version += 1
        return done

    def facet_step(self, max_rows: int) -> int:
        """Read the ``record`` JSON of up to ``max_rows`` rows not yet faceted; how many were."""
        for pi, part in enumerate(self.parts):
            lo = part.facets.n
            if lo >= part.n:
                continue
            hi = min(part.n, lo + max_rows)
            for text in self.record_texts(pi, lo, hi):
                self._facet(part, text)
            return hi - lo
        return 0

    def _facet(self, part: Part, text: str) -> None:
        try:
            rec = json.loads(text)
        except ValueError:
            rec = {}
        if not isinstance(rec, dict):
            rec = {}
        turns, latency, replayed = self.aggregates.add(rec)
        roles, models = record_names(rec)
        part.facets.append(turns, latency, replayed, self.roles.mask(roles), self.models.mask(models))
        if self._on_record is not None:
            self._on_record(rec)

    # -- reading records ---------------------------------------------------------

    def record_chunk(self, pi: int, k: int, need: int) -> np.ndarray:
        """Chunk ``k`` of part ``pi``'s ``record`` column, good for rows below ``need``."""
        key = (pi, k)
        hit = self._records.get(key)
        if hit is not None and hit[1] >= need:
            self._records.move_to_end(key)
            return hit[0]
        part = self.parts[pi]
        data = part.column("record").chunk(k)
        self._records[key] = (data, part.n)
        self._records.move_to_end(key)
        while len(self._records) > 1 and sum(len(v[0]) for v in self._records.values()) > _RECORD_CACHE_ROWS:
            self._records.popitem(last=False)
        return data

    def record_texts(self, pi: int, lo: int, hi: int) -> Iterator[str]:
        """The JSON text of part ``pi``'s rows ``[lo, hi)`` (committed rows only)."""
        cr = self.parts[pi].column("record").chunk_rows
        for k in range(lo // cr, (hi - 1) // cr + 1) if hi > lo else ():
            base = k * cr
            data = self.record_chunk(pi, k, min(hi, base + cr))
            yield from data[max(lo - base, 0) : hi - base].tolist()

    def record_text(self, pi: int, row: int) -> str:
        return next(self.record_texts(pi, row, row + 1))

    def find_id(self, rid: str, hint: tuple[int, int] | None = None) -> tuple[int, int] | None:
        """Where the current record of ``rid`` is (store.latest's rule: not one a retry replaced):
        the hint if it holds it, else a scan of the id columns by chunks."""
        if hint is not None:
            pi, row = hint
            if 0 <= pi < len(self.parts) and 0 <= row < self.parts[pi].n and self.parts[pi].column("id").read(row, row + 1).tolist() == [rid]:
                if not (self.parts[pi].cols and self.parts[pi].cols["replaced"].values[row]):
                    return hint
        hits = self.find_all(rid)
        return hits[-1] if hits else None

    def find_all(self, rid: str) -> list[tuple[int, int]]:
        """(part, row) of every record of ``rid``, in store order: replaced ones first, the current one last."""
        out = []
        for pi, part in enumerate(self.parts):
            col = part.column("id")
            for k in range((part.n + col.chunk_rows - 1) // col.chunk_rows):
                ids = col.chunk(k)[: part.n - k * col.chunk_rows]
                out += [(pi, k * col.chunk_rows + int(h)) for h in np.flatnonzero(ids == rid)]
        return out

    # -- the whole store as one array per column --------------------------------

    @property
    def n(self) -> int:
        return sum(p.n for p in self.parts)

    @property
    def faceted(self) -> int:
        return sum(p.facets.n for p in self.parts)

    def offsets(self) -> list[int]:
        out, acc = [], 0
        for p in self.parts:
            out.append(acc)
            acc += p.n
        return out

    def locate(self, g: int) -> tuple[int, int]:
        """(part, row) of global row ``g`` (rows numbered part after part)."""
        for pi, off in reversed(list(enumerate(self.offsets()))):
            if g >= off:
                return pi, g - off
        raise IndexError(g)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every part's columns as one array each (views for a one-part store; cached until
        rows are added or faceted); facet columns hold 0 for rows not yet faceted (see
        ``faceted``)."""
        key = (self.version, self.faceted)  # load_numeric bumps the version
        if self._concat is not None and self._concat[0] == key:
            return self._concat[1]
        out: dict[str, np.ndarray] = {}
        for name in ("status", "kind"):
            out[name] = _join([p.cols[name].values if p.cols else np.zeros(0, np.int8) for p in self.parts])
        out["current"] = ~_join([p.cols["replaced"].values if p.cols else np.zeros(0, np.bool_) for p in self.parts])
        for name, dtype in _NUMERIC.items():
            out[name] = _join([_padded(p.cols[name].values if p.cols else np.zeros(0, dtype), p.n) for p in self.parts])
        for name in ("turns", "latency", "replayed", "roles", "models"):
            out[name] = _join([getattr(p.facets, name)[: p.n] for p in self.parts])
        out["faceted"] = _join([np.arange(p.n) < p.facets.n for p in self.parts])
        self._concat = (key, out)
        return out

    def nbytes(self) -> int:
        """Memory the index holds (columns and facets; not the record cache)."""
        total = 0
        for p in self.parts:
            total += sum(g.buf.nbytes for g in p.cols.values()) + p.facets.nbytes()
        return total
