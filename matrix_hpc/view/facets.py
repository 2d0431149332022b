"""What the viewer learns from each record's JSON, once: its roles, models, turns and
latency (for the table's filters and sorts) and the run-wide LLM accounting and
latency histograms (for the run page).

The per-record part is a few fixed-size numbers (see :class:`FacetArrays`), so a
million records cost ~24 MB; the records themselves are not kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..store.tokens import TokenUsage

__all__ = ["Aggregates", "FacetArrays", "LATENCY_BINS", "Vocab", "record_names"]

# Latency histogram bins: 10 per decade from 1 ms to 1000 s (values outside go to the ends).
_LAT_LO, _PER_DECADE, _DECADES = -3, 10, 6
LATENCY_BINS = [10 ** (_LAT_LO + i / _PER_DECADE) for i in range(_PER_DECADE * _DECADES + 1)]
OVERFLOW_BIT = 63
"""Names past the 63rd of a vocabulary share this bit: a filter on one of them must read the record."""


def _lat_bin(seconds: float) -> int:
    if not seconds > 0:
        return 0
    i = int((math.log10(seconds) - _LAT_LO) * _PER_DECADE)
    return min(max(i, 0), _PER_DECADE * _DECADES - 1)


class Vocab:
    """Names (roles, models) to bit positions, in order of first sight."""

    def __init__(self) -> None:
        self.names: dict[str, int] = {}

    def bit(self, name: str) -> int:
        i = self.names.get(name)
        if i is None:
            i = self.names[name] = len(self.names)
        return min(i, OVERFLOW_BIT)

    def mask(self, names: set[str]) -> int:
        m = 0
        for n in names:
            m |= 1 << self.bit(n)
        return m

    def lookup(self, name: str) -> tuple[int, bool] | None:
        """(bit, exact) for a known name; None if no record has it."""
        i = self.names.get(name)
        if i is None:
            return None
        return min(i, OVERFLOW_BIT), i < OVERFLOW_BIT


def record_names(rec: dict[str, Any]) -> tuple[set[str], set[str]]:
    """The roles and the models of a record's LLM calls (its turns)."""
    roles, models = set(), set()
    for t in rec.get("turns") or ():
        if isinstance(t, dict):
            roles.add(str(t.get("role")))
            if t.get("model") is not None:
                models.add(str(t.get("model")))
    return roles, models


@dataclass
class _Usage:
    """One role's or model's calls: those made by the run (``live``) and those answered from
    the call journal (``replayed``: counted, their latency not, as it is not this run's)."""

    live: TokenUsage = TokenUsage()
    replayed: TokenUsage = TokenUsage()

    @property
    def calls(self) -> int:
        return self.live.calls + self.replayed.calls

    def to_dict(self) -> dict[str, Any]:
        every = (self.live + self.replayed).to_dict()
        del every["latency_s"]  # the API gives the live calls' mean instead
        mean = round(self.live.mean_latency_s, 4) if self.live.calls else None
        return {**every, "replayed": self.replayed.calls, "mean_latency_s": mean}


@dataclass
class Aggregates:
    """LLM accounting over the records seen so far: per role, per model, and each model's
    latency histogram (replayed calls are counted, their latency is not: it is not this run's)."""

    calls: dict[tuple[str, str, bool], TokenUsage] = field(default_factory=dict)
    """The calls by (role, model, replayed): one sum per turn (the view adds up millions);
    :attr:`by_role` and :attr:`by_model` fold these few keys."""
    latency_hist: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, rec: dict[str, Any]) -> tuple[int, float, int]:
        """Add one record; returns its (turns, summed live latency, replayed calls)."""
        turns = rec.get("turns") or ()
        latency = 0.0
        replayed = 0
        calls = self.calls
        for t in turns:
            if not isinstance(t, dict):
                continue
            call = TokenUsage.of_turn(t)
            model, rep = str(t.get("model") or "unknown"), bool(t.get("replayed"))
            key = (str(t.get("role")), model, rep)
            had = calls.get(key)
            calls[key] = call if had is None else had + call
            if rep:
                replayed += 1
                continue
            latency += call.latency_s
            hist = self.latency_hist.get(model)
            if hist is None:
                hist = self.latency_hist[model] = np.zeros(len(LATENCY_BINS) - 1, dtype=np.int64)
            hist[_lat_bin(call.latency_s)] += 1
        return len(turns), latency, replayed

    def _by(self, at: int) -> dict[str, _Usage]:
        out: dict[str, _Usage] = {}
        for key, u in self.calls.items():
            acc = out.setdefault(key[at], _Usage())
            if key[2]:
                acc.replayed += u
            else:
                acc.live += u
        return out

    @property
    def by_role(self) -> dict[str, _Usage]:
        return self._by(0)

    @property
    def by_model(self) -> dict[str, _Usage]:
        return self._by(1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "by_role": {k: v.to_dict() for k, v in sorted(self.by_role.items())},
            "by_model": {k: v.to_dict() for k, v in sorted(self.by_model.items())},
            "latency_bins": LATENCY_BINS,
            "latency_hist": {k: v.tolist() for k, v in sorted(self.latency_hist.items())},
        }


class FacetArrays:
    """Per record, in commit order: turns, summed LLM latency, replayed calls, role and model bit masks."""

    def __init__(self) -> None:
        self.n = 0
        self._cap = 0
        self.turns = np.zeros(0, np.uint16)
        self.latency = np.zeros(0, np.float32)
        self.replayed = np.zeros(0, np.uint16)
        self.roles = np.zeros(0, np.uint64)
        self.models = np.zeros(0, np.uint64)

    def _grow(self, need: int) -> None:
        cap = max(need, self._cap * 2, 1024)
        for name in ("turns", "latency", "replayed", "roles", "models"):
            old = getattr(self, name)
            new = np.zeros(cap, old.dtype)
            new[: self.n] = old[: self.n]
            setattr(self, name, new)
        self._cap = cap

    def reserve(self, n: int) -> None:
        """Room for ``n`` records (rows past :attr:`n` read as 0)."""
        if n > self._cap:
            self._grow(n)

    def append(self, turns: int, latency: float, replayed: int, roles: int, models: int) -> None:
        if self.n >= self._cap:
            self._grow(self.n + 1)
        i = self.n
        self.turns[i] = min(turns, 65535)
        self.latency[i] = latency
        self.replayed[i] = min(replayed, 65535)
        self.roles[i] = roles
        self.models[i] = models
        self.n += 1

    def nbytes(self) -> int:
        return sum(getattr(self, n).nbytes for n in ("turns", "latency", "replayed", "roles", "models"))
