"""Which record of an id a reader sees: the latest one (the retry rule, issue 26).

The store is append-only. ``matrix-hpc run --retry-failed`` (``run.retry_failed``) runs an
id whose latest record is failed again, and its new record is *appended*, in the same part,
with the ``replaces`` column holding the row of the record it replaces (-1: a first
record). The writer accepts such a row only while that row is still the id's latest
record and failed (a compare-and-swap), so a copy of the retried task (re-sent after a
crash) is refused like any duplicate: each retry adds one record at most.

The rule every reader follows, here and nowhere else: **a record is current unless a
later row of its part replaces it.** Counts, ``status``, summaries, workflow metrics,
exports, ``show``, ``sample`` and the viewer see current records only, one per id; the
replaced ones stay in the store as the id's history (``matrix-hpc show OUT ID --history``).
A store written before this rule has no ``replaces`` column: every record is current.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .idhash import IdHashes, hash_ids, undecided
from .record_row import REPLACES

__all__ = ["REPLACES", "PartColumns", "ResumeState", "current_mask", "resume_state", "retry_kinds"]

log = logging.getLogger(__name__)

"""The column: the row (of the same part) that a record replaces, -1 when it replaces none."""


def current_mask(replaces: np.ndarray) -> np.ndarray | None:
    """Which of rows ``[0, n)`` are current, given their ``replaces`` values (n of them):
    None when every row is (no retry in them, the usual case: nothing to filter)."""
    replaces = np.asarray(replaces, dtype=np.int64)
    hit = replaces[(replaces >= 0) & (replaces < len(replaces))]
    if not len(hit):
        return None
    mask = np.ones(len(replaces), bool)
    mask[hit] = False
    return mask


def retry_kinds(value: str | list[str] | None) -> frozenset[str] | None:
    """``run.retry_failed`` as the failure kinds to run again: None (off), an empty set
    (every kind: ``all``), or the named kinds (``agent_error,schema`` or a list)."""
    if value is None:
        return None
    items = value if isinstance(value, list) else str(value).split(",")
    kinds = frozenset(k.strip() for k in items if k.strip())
    if not kinds:
        raise ValueError(f"expected all, or failure kinds (agent_error,schema), got {value!r}")
    return frozenset() if "all" in kinds else kinds


@dataclass
class ResumeState:
    """What a run does with the ids already in the store."""

    skip: IdHashes
    """Ids not to run: their current record stays as it is (hashes: 8 bytes an id)."""
    retry: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Ids to run again, each with the ``retry_of`` its new record carries (the row it replaces)."""
    failed_by_kind: Counter[str] = field(default_factory=Counter)
    """Current failed records by kind (those retried and those left)."""
    kinds_seen: set[str] = field(default_factory=set)
    """Every failure kind in the store, replaced records included."""

    @property
    def failed(self) -> int:
        return sum(self.failed_by_kind.values())


class PartColumns(Protocol):
    """One part's committed rows, read a slice at a time (a part may hold millions)."""

    rows: int
    replaces: np.ndarray
    """The whole ``replaces`` column (8 bytes a row)."""

    def read(self, lo: int, hi: int) -> tuple[list[str], list[str], list[str]]:
        """Rows ``[lo, hi)``: (id, status, error_kind)."""
        ...


CHUNK_ROWS = 1 << 18
"""Rows of a part read at once: the ids pass through Python 262,144 at a time (~45 MB)."""


def resume_state(parts: Iterable[PartColumns], kinds: frozenset[str] | None, exact_hashes: Iterable[int] = ()) -> ResumeState:
    """From each part's committed ``(id, status, error_kind, replaces)`` columns: the ids to
    skip and, with ``kinds`` (see :func:`retry_kinds`), the ids whose current record is failed
    with one of them (any kind when empty), to run again.

    The ids to skip are kept as 64-bit hashes (:class:`~.idhash.IdHashes`): a million ids
    are ~8 MB, not ~100 MB of Python strings. ``exact_hashes``: hashes that two ids of the
    dataset share (the source's scan finds them); ids with one of them are kept as text."""
    exact_hashes = frozenset(exact_hashes)
    state = ResumeState(skip=IdHashes.of(()))
    parts = list(parts)
    # One array for every hash, allocated once: chunks of hashes kept between the chunks of
    # ids would pin the heap the ids were freed from (RSS ~45 bytes an id, not 8).
    hashes = np.empty(sum(p.rows for p in parts), np.uint64)
    filled = 0
    held: set[str] = set()
    for part in parts:
        mask = current_mask(part.replaces)
        replaced_ids: Counter[str] = Counter()  # replaced records per id (few: retries only; a replaced row precedes its retry)
        for lo in range(0, part.rows, CHUNK_ROWS):
            ids, status, kind = part.read(lo, min(part.rows, lo + CHUNK_ROWS))
            failed = np.asarray(status, dtype=object) == "failed"
            kind_arr = np.asarray(kind, dtype=object)
            state.kinds_seen.update(kind_arr[failed].tolist())
            current = np.ones(len(ids), bool) if mask is None else mask[lo : lo + len(ids)]
            replaced_ids.update(ids[i] for i in np.flatnonzero(~current).tolist())
            skip = current.copy()
            for i in np.flatnonzero(failed & current).tolist():
                rid, k = ids[i], kind_arr[i]
                state.failed_by_kind[k] += 1
                if kinds is not None and (not kinds or k in kinds):
                    state.retry[rid] = {"row": lo + i, "error_kind": k, "records": 1 + replaced_ids.get(rid, 0)}
                    skip[i] = False
            kept = [ids[i] for i in np.flatnonzero(skip).tolist()] if not skip.all() else ids
            chunk = hashes[filled : filled + len(kept)]
            chunk[:] = hash_ids(kept, len(kept))
            filled += len(kept)
            held.update(undecided(kept, chunk, exact_hashes))
    skip = IdHashes(hashes[:filled], held, exact_hashes, owned=True)
    if state.retry:  # an id retried from one part and current in another is not skipped (as before: ids, not rows)
        skip = skip.without(state.retry)
    state.skip = skip
    return state
