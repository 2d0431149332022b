"""Sets of ids in 8 bytes an id: 64-bit hashes in a sorted numpy array (issue 24).

A run of a hundred million rows cannot hold its ids as Python strings (~60-100 bytes
each, plus a set's slot): the driver would need gigabytes. Where a run needs "is this id
in that set" over every row (the ids a resume skips, the source's repeated ids), it keeps
each id's 64-bit hash (:func:`id_hash`) instead, and the few ids a hash cannot decide
exactly as strings:

* every id holding :data:`MARK` (the source's duplicate ids, ``ID#dup@line7``: a row's own
  id may look like one of them, so the source compares them as text);
* every id whose hash the caller names as shared by two ids (``exact_hashes``: the source's
  scan found two rows with that hash, a duplicate or a collision).

So a collision between two ids the dataset holds never skips a row: both have the hash the
scan flagged, and they are compared as text. What is left is a dataset id colliding with a
store id that is not in the dataset (the dataset changed between runs), odds n*m/2^64.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable
from typing import Any

import numpy as np

__all__ = ["MARK", "IdHashes", "hash_ids", "id_hash", "undecided"]

MARK = "#dup@"
"""In the ids the source makes for a repeated id's later rows (``ID#dup@WHERE``)."""


def id_hash(tid: str) -> int:
    """A stable 64-bit hash of an id (blake2b of its UTF-8; never 0)."""
    h = int.from_bytes(hashlib.blake2b(tid.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return h or 1


def hash_ids(ids: Iterable[str], count: int = -1) -> np.ndarray:
    """The ids' hashes as a uint64 array, in order."""
    return np.fromiter(map(id_hash, ids), np.uint64, count)


class IdHashes:
    """An immutable set of ids (``in``, ``len``, ``|``): sorted unique hashes, 8 bytes an
    id, plus the ids held as text (see the module docstring)."""

    __slots__ = ("_hashes", "_exact", "_exact_hashes")

    def __init__(self, hashes: np.ndarray, exact: Iterable[str] = (), exact_hashes: Iterable[int] = (), owned: bool = False) -> None:
        """``owned``: ``hashes`` may be sorted in place (no copy: 9 bytes an id on top at the peak)."""
        hashes = np.asarray(hashes, np.uint64)
        hashes = hashes if owned else hashes.copy()
        hashes.sort()
        keep = np.ones(len(hashes), bool)
        np.not_equal(hashes[1:], hashes[:-1], out=keep[1:])
        self._hashes = hashes if keep.all() else hashes[keep]
        self._exact = frozenset(exact)
        self._exact_hashes = frozenset(exact_hashes)

    @classmethod
    def of(cls, ids: Iterable[str], exact_hashes: Iterable[int] = ()) -> IdHashes:
        """The set of ``ids`` (a small one: the ids pass through Python once)."""
        ids = list(ids)
        hashes = hash_ids(ids, len(ids))
        exact_hashes = frozenset(exact_hashes)
        return cls(hashes, undecided(ids, hashes, exact_hashes), exact_hashes)

    def __contains__(self, tid: object) -> bool:
        if not isinstance(tid, str):
            return False
        h = id_hash(tid)
        if MARK in tid or h in self._exact_hashes:
            return tid in self._exact
        i = int(np.searchsorted(self._hashes, np.uint64(h)))
        return i < len(self._hashes) and self._hashes.item(i) == h

    def __len__(self) -> int:
        return len(self._hashes)

    def __bool__(self) -> bool:
        return len(self._hashes) > 0

    def __or__(self, ids: Iterable[str]) -> IdHashes:
        ids = list(ids)
        if not ids:  # the usual case (no retry): no copy of the hashes
            return self
        more = hash_ids(ids, len(ids))
        out = IdHashes(np.concatenate([self._hashes, more]), self._exact, self._exact_hashes)
        out._exact = self._exact | frozenset(undecided(ids, more, self._exact_hashes))
        return out

    def without(self, ids: Collection[str]) -> IdHashes:
        """This set less ``ids`` (a small set)."""
        gone = hash_ids(ids, len(ids))
        out = IdHashes(self._hashes[~np.isin(self._hashes, gone)], self._exact - frozenset(ids), self._exact_hashes)
        return out

    def __eq__(self, other: Any) -> bool:
        """Equal to a set of strings holding the same ids (as far as hashes tell)."""
        if isinstance(other, IdHashes):
            return bool(np.array_equal(self._hashes, other._hashes)) and self._exact == other._exact
        if isinstance(other, (set, frozenset)):
            return len(other) == len(self) and all(tid in self for tid in other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def nbytes(self) -> int:
        """Bytes of the hash array (the ids held as text are few)."""
        return int(self._hashes.nbytes)

    def __repr__(self) -> str:
        return f"IdHashes({len(self)} ids, {len(self._exact)} held as text)"


def undecided(ids: Iterable[str], hashes: np.ndarray, exact_hashes: frozenset[int]) -> list[str]:
    """Of ``ids`` (hashed to ``hashes``), those an :class:`IdHashes` holds as text."""
    out = []
    flagged = np.isin(hashes, np.fromiter(exact_hashes, np.uint64, len(exact_hashes))) if exact_hashes else None
    for i, tid in enumerate(ids):
        if MARK in tid or (flagged is not None and flagged[i]):
            out.append(tid)
    return out
