"""The records table's queries over a :class:`~.index.StoreIndex`: filter, sort, page.

Filters on the indexed columns (status, failure kind; role and model once a row is
faceted) are numpy masks over the whole store. What they cannot decide, a text
search and a role or model filter on rows not faceted yet, is decided row by row
from the record's JSON text, under a time budget: a query returns what it found so
far with ``complete: false`` and the page asks again; each row's answer is kept
(:class:`LazyCache`), so asking again continues where the last call stopped.
The record JSON is parsed only for the rows of the page shown.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from .facets import record_names
from .index import StoreIndex

__all__ = ["LazyCache", "Query", "QueryError", "SORTS", "record_page", "row_summary", "run_query"]

SORTS = ("order", "finished_at", "status", "kind", "prompt_tokens", "completion_tokens", "tokens", "turns", "latency")
_NUMERIC_SORTS = ("finished_at", "prompt_tokens", "completion_tokens", "tokens")
MAX_LIMIT = 500
_BATCH = 256  # rows decided between two looks at the clock


class QueryError(ValueError):
    """A query parameter that is not valid (the message names it)."""


@dataclass(frozen=True)
class Query:
    status: tuple[str, ...] = ()
    kind: tuple[str, ...] = ()
    role: str = ""
    model: str = ""
    search: str = ""
    sort: str = "order"
    desc: bool = False
    offset: int = 0
    limit: int = 50

    @classmethod
    def from_params(cls, p: dict[str, str]) -> Query:
        def ints(name: str, default: int, lo: int, hi: int) -> int:
            raw = p.get(name)
            if raw in (None, ""):
                return default
            try:
                v = int(raw)  # type: ignore[arg-type]
            except ValueError:
                raise QueryError(f"{name}: expected an integer, got {raw!r}") from None
            if not lo <= v <= hi:
                raise QueryError(f"{name}: must be between {lo} and {hi}, got {v}")
            return v

        sort = p.get("sort") or "order"
        if sort not in SORTS:
            raise QueryError(f"sort: expected one of {', '.join(SORTS)}, got {sort!r}")
        split = lambda v: tuple(s for s in (v or "").split(",") if s)  # noqa: E731
        return cls(
            status=split(p.get("status")), kind=split(p.get("kind")), role=p.get("role") or "", model=p.get("model") or "",
            search=(p.get("q") or "").strip(), sort=sort, desc=p.get("desc") in ("1", "true"),
            offset=ints("offset", 0, 0, 1 << 40), limit=ints("limit", 50, 1, MAX_LIMIT),
        )  # fmt: skip

    @property
    def lazy_key(self) -> tuple[str, str, str]:
        return (self.search.lower(), self.role, self.model)


class _Matcher:
    """The search text as it appears inside a record's JSON text (escaped as JSON writes it),
    case-insensitive. An ASCII needle is matched on UTF-8 bytes with ASCII case folding, so a
    whole chunk's bytes can be tested at once (``bytes.lower`` and ``in`` run at memory
    speed); any other is compared lower-cased, string by string."""

    def __init__(self, search: str) -> None:
        needle = json.dumps(search, ensure_ascii=False)[1:-1]
        self.ascii = needle.isascii()
        self.lower = needle.lower()
        self.lower_bytes = needle.encode().lower()

    def text(self, text: str) -> bool:
        if self.ascii:
            return self.lower_bytes in text.encode("utf-8", "surrogatepass").lower()
        return self.lower in text.lower()

    def chunk_may_match(self, buf: bytes | None) -> bool:
        """False only if no element of the chunk whose bytes are ``buf`` can match."""
        return buf is None or not self.ascii or self.lower_bytes in buf.lower()


class _Lazy:
    """Per row of the store: 0 not decided yet, 1 matches, 2 does not (for one lazy key)."""

    def __init__(self, layout: list[int]) -> None:
        self.layout = layout
        self.state = np.zeros(sum(layout), np.int8)


class LazyCache:
    """The lazy answers of the last few queries, by (index generation, search, role, model)."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._items: OrderedDict[tuple[int, str, str, str], _Lazy] = OrderedDict()

    def get(self, key: tuple[int, str, str, str], layout: list[int]) -> _Lazy:
        item = self._items.get(key)
        # Rows are only ever added at the end of a part: the answers kept stay where they are
        # only if no part but the last grew (in practice a store has one part).
        old = item.layout if item is not None else None
        if item is None or len(old) != len(layout) or old[:-1] != layout[:-1] or (old and old[-1] > layout[-1]):
            item = _Lazy(list(layout))
        elif old != layout:
            grown = np.zeros(sum(layout), np.int8)
            grown[: len(item.state)] = item.state
            item.state, item.layout = grown, list(layout)
        self._items[key] = item
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return item


def _name_mask(ix: StoreIndex, arrays: dict[str, np.ndarray], col: str, name: str) -> tuple[np.ndarray, bool]:
    """Rows that may have an LLM call by role/model ``name``, and whether some need their JSON read."""
    vocab = ix.roles if col == "roles" else ix.models
    faceted = arrays["faceted"]
    look = vocab.lookup(name)
    if look is None:  # no faceted row has it: only rows not faceted yet may
        return ~faceted, not bool(faceted.all())
    bit, exact = look
    has = (arrays[col] & np.uint64(1 << bit)) != 0
    return has | ~faceted, (not exact) or not bool(faceted.all())


def _sort_key(ix: StoreIndex, arrays: dict[str, np.ndarray], sort: str, rows: np.ndarray) -> np.ndarray | None:
    if sort == "order":
        return None
    if sort in ("status", "kind"):
        codes = ix.status if sort == "status" else ix.kind
        rank = np.argsort(np.argsort(np.array(codes.names, dtype=object))) if codes.names else np.zeros(0, np.int64)
        return rank[arrays[sort][rows]]
    if sort == "tokens":
        return arrays["prompt_tokens"][rows] + arrays["completion_tokens"][rows]
    return arrays[sort][rows]


def _order(ix: StoreIndex, arrays: dict[str, np.ndarray], q: Query, rows: np.ndarray) -> np.ndarray:
    """``rows`` (ascending) in the query's order; ties keep commit order."""
    key = _sort_key(ix, arrays, q.sort, rows)
    if key is None:
        return rows[::-1] if q.desc else rows
    idx = np.lexsort((rows, -key.astype(np.float64) if q.desc else key))
    return rows[idx]


def _decide(ix: StoreIndex, q: Query, state: np.ndarray, offsets: list[int], rows: np.ndarray) -> None:
    """Decide ``rows`` (global numbers, state 0, ascending or descending) from their JSON text,
    chunk by chunk; a chunk the search text is nowhere in is decided without decoding it."""
    matcher = _Matcher(q.search) if q.search else None
    pis = np.searchsorted(np.array(offsets), rows, side="right") - 1
    locs = rows - np.array(offsets)[pis]
    cr = np.array([ix.parts[pi].column("record").chunk_rows for pi in range(len(ix.parts))])[pis]
    ks = locs // cr
    cuts = np.flatnonzero((np.diff(pis) != 0) | (np.diff(ks) != 0)) + 1
    for start, end in zip([0, *cuts.tolist()], [*cuts.tolist(), len(rows)]):
        pi, k = int(pis[start]), int(ks[start])
        group = rows[start:end]
        col = ix.parts[pi].column("record")
        if matcher is not None and not matcher.chunk_may_match(col.chunk_bytes(k)):
            state[group] = 2
        else:
            for g, row in zip(group.tolist(), locs[start:end].tolist()):
                text = ix.record_text(pi, row)
                ok = matcher is None or matcher.text(text)
                if ok and (q.role or q.model):
                    try:
                        roles, models = record_names(json.loads(text))
                    except (ValueError, AttributeError):
                        roles, models = set(), set()
                    ok = (not q.role or q.role in roles) and (not q.model or q.model in models)
                state[g] = 1 if ok else 2


def run_query(ix: StoreIndex, q: Query, cache: LazyCache, budget_s: float = 1.0, max_rows: int | None = None) -> dict[str, Any]:
    """One page of the records table: ``rows`` (summaries), ``total`` matches known, and
    ``complete`` (False: rows are still being decided; ``scanned`` says how far). Rows are
    decided from their JSON for up to ``budget_s`` seconds (and at most ``max_rows`` rows)."""
    if q.sort in _NUMERIC_SORTS:
        ix.load_numeric()  # the background loads them right after new rows: rarely left to do here
    arrays = ix.arrays()
    n = ix.n
    mask = arrays["current"].copy()  # records a retry replaced are not shown (store.latest)
    for col, names, codes in (("status", q.status, ix.status), ("kind", q.kind, ix.kind)):
        if names:
            wanted = [c for c in (codes.code(s) for s in names) if c is not None]
            mask &= np.isin(arrays[col], np.array(wanted, dtype=arrays[col].dtype)) if wanted else False
    lazy = bool(q.search)
    for col, name in (("roles", q.role), ("models", q.model)):
        if name:
            m, need = _name_mask(ix, arrays, col, name)
            mask &= m
            lazy |= need
    order = _order(ix, arrays, q, np.flatnonzero(mask))
    want = q.offset + q.limit
    if not lazy:
        page, total, complete, scanned = order[q.offset : want], len(order), True, 1.0
    else:
        offsets = ix.offsets()
        state = cache.get((ix.generation, *q.lazy_key), [p.n for p in ix.parts]).state
        # Commit order: walk the page's order, and stop once the rows before the first one
        # still open hold the page (the first page is exact at once). Any other order: walk
        # in storage order (chunk after chunk); the page is exact once every row is decided.
        by_order = q.sort == "order"
        walk = order if by_order else np.sort(order)
        st0 = state[walk]
        open_idx = np.flatnonzero(st0 == 0)
        before = np.cumsum(st0 == 1)
        deadline = time.monotonic() + budget_s
        pos = found = 0

        def prefix_matches() -> int:
            end = int(open_idx[pos]) if pos < len(open_idx) else len(walk)
            return (int(before[end - 1]) if end else 0) + found

        limit = len(open_idx) if max_rows is None else min(len(open_idx), max_rows)
        while pos < limit and not (by_order and prefix_matches() >= want) and time.monotonic() < deadline:
            batch = walk[open_idx[pos : min(pos + _BATCH, limit)]]
            _decide(ix, q, state, offsets, batch)
            found += int(np.count_nonzero(state[batch] == 1))
            pos += len(batch)
        st = state[order]
        open_left = int(np.count_nonzero(st == 0))
        complete = open_left == 0
        if by_order and not complete:
            first_open = int(np.flatnonzero(st == 0)[0])
            matched = order[:first_open][st[:first_open] == 1]
        else:
            matched = order[st == 1]
        total = int(np.count_nonzero(st == 1))
        page = matched[q.offset : want]
        scanned = 1.0 - open_left / len(order) if len(order) else 1.0
    loading = not ix.caught_up  # rows committed but not indexed yet (the first seconds of a big store)
    if loading:
        unfiltered = not (q.status or q.kind or q.role or q.model or q.search)
        if unfiltered:
            total = ix.committed_total
        complete = unfiltered and q.sort == "order" and not q.desc and want <= n
        scanned = min(scanned, n / max(ix.committed_total, 1))
    return {
        "rows": record_page(ix, page),
        "total": int(total),
        "complete": bool(complete),
        "exact": bool(complete or (q.sort == "order" and not (loading and q.desc) and len(page) == min(q.limit, max(total - q.offset, 0)))),
        "loading": loading,
        "scanned": round(float(scanned), 4),
        "records": n,
        "offset": q.offset,
        "limit": q.limit,
    }


def record_page(ix: StoreIndex, rows: np.ndarray) -> list[dict[str, Any]]:
    """Summaries of global rows ``rows`` (their JSON parsed here, and only here)."""
    offsets = ix.offsets()
    out = []
    for g in rows.tolist():
        pi = int(np.searchsorted(np.array(offsets), g, side="right") - 1)
        row = g - offsets[pi]
        out.append(row_summary(json.loads(ix.record_text(pi, row)), f"{ix.parts[pi].name}:{row}", g))
    return out


def _preview(rec: dict[str, Any], limit: int = 160) -> str:
    err = rec.get("error") or {}
    if rec.get("status") == "failed" and err.get("message"):
        text = str(err["message"])
    else:
        turns = [t for t in rec.get("turns") or () if isinstance(t, dict) and t.get("text")]
        row = rec.get("row") if isinstance(rec.get("row"), dict) else {}
        firsts = [v for k, v in row.items() if k != "id" and isinstance(v, str)]
        text = str(turns[-1]["text"]) if turns else (firsts[0] if firsts else "")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def row_summary(rec: dict[str, Any], ref: str, g: int) -> dict[str, Any]:
    usage = rec.get("usage") or {}
    turns = [t for t in rec.get("turns") or () if isinstance(t, dict)]
    roles, models = record_names(rec)
    return {
        "n": g + 1,
        "ref": ref,
        "id": rec.get("id"),
        "status": rec.get("status"),
        "kind": (rec.get("error") or {}).get("kind") or "",
        "turns": len(turns),
        "roles": sorted(roles),
        "models": sorted(models),
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "completion_tokens": usage.get("completion_tokens", 0),
        "latency_s": round(sum(float(t.get("latency_s") or 0) for t in turns if not t.get("replayed")), 3),
        "replayed": sum(bool(t.get("replayed")) for t in turns),
        "finished_at": rec.get("finished_at"),
        "preview": _preview(rec),
    }
