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
from typing import Any

import numpy as np

__all__ = ["REPLACES", "ResumeState", "current_mask", "resume_state", "retry_kinds"]

log = logging.getLogger(__name__)

REPLACES = "replaces"
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

    skip: set[str]
    """Ids not to run: their current record stays as it is."""
    retry: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Ids to run again, each with the ``retry_of`` its new record carries (the row it replaces)."""
    failed_by_kind: Counter[str] = field(default_factory=Counter)
    """Current failed records by kind (those retried and those left)."""
    kinds_seen: set[str] = field(default_factory=set)
    """Every failure kind in the store, replaced records included."""

    @property
    def failed(self) -> int:
        return sum(self.failed_by_kind.values())


def resume_state(parts: Iterable[tuple[list[str], list[str], list[str], np.ndarray]], kinds: frozenset[str] | None) -> ResumeState:
    """From each part's committed ``(id, status, error_kind, replaces)`` columns: the ids to
    skip and, with ``kinds`` (see :func:`retry_kinds`), the ids whose current record is failed
    with one of them (any kind when empty), to run again."""
    state = ResumeState(skip=set())
    for ids, status, kind, replaces in parts:
        id_arr = np.asarray(ids, dtype=object)
        failed = np.asarray(status, dtype=object) == "failed"
        kind_arr = np.asarray(kind, dtype=object)
        state.kinds_seen.update(kind_arr[failed].tolist())
        mask = current_mask(replaces)
        current = np.ones(len(id_arr), bool) if mask is None else mask
        earlier = Counter(id_arr[~current].tolist())  # replaced records per id (few: retries only)
        for row in np.flatnonzero(failed & current).tolist():
            rid, k = id_arr[row], kind_arr[row]
            state.failed_by_kind[k] += 1
            if kinds is not None and (not kinds or k in kinds):
                state.retry[rid] = {"row": row, "error_kind": k, "records": 1 + earlier.get(rid, 0)}
        state.skip.update(id_arr[current].tolist())
    state.skip.difference_update(state.retry)
    return state
