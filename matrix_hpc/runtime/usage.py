"""LLM accounting of a run: tokens, calls, errors and latency per role and per model; what replay saved.

The counters are :class:`~matrix_hpc.store.tokens.TokenUsage` values; this module only groups them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..store.tokens import TokenUsage

__all__ = ["ReplaySummary", "UsageSummary", "replay_summary", "usage_summary"]

_SECTIONS = ("by_role", "by_model")


@dataclass
class UsageSummary:
    """Each role's and each model's LLM calls, added up over records."""

    by_role: dict[str, TokenUsage] = field(default_factory=dict)
    by_model: dict[str, TokenUsage] = field(default_factory=dict)

    def add_record(self, usage: Mapping[str, Any] | None) -> None:
        """Add one record's ``usage`` (or one run.json ``usage``): its ``by_role`` / ``by_model`` entries."""
        for section in _SECTIONS:
            acc: dict[str, TokenUsage] = getattr(self, section)
            for name, counts in ((usage or {}).get(section) or {}).items():
                acc[name] = acc.get(name, TokenUsage()) + TokenUsage.from_dict(counts)

    def __add__(self, other: UsageSummary) -> UsageSummary:
        out = UsageSummary()
        for part in (self, other):
            for section in _SECTIONS:
                acc: dict[str, TokenUsage] = getattr(out, section)
                for name, u in getattr(part, section).items():
                    acc[name] = acc.get(name, TokenUsage()) + u
        return out

    def to_dict(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Plain data for run.json (with each entry's mean latency, for readers of the file)."""
        return {
            section: {name: {**u.to_dict(), "mean_latency_s": round(u.mean_latency_s, 4)} for name, u in getattr(self, section).items()}
            for section in _SECTIONS
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> UsageSummary:
        out = cls()
        out.add_record(data)
        return out


def usage_summary(records: Iterable[dict[str, Any]]) -> UsageSummary:
    """Add up each record's ``usage.by_role`` / ``usage.by_model`` (failed records included: they cost tokens too)."""
    out = UsageSummary()
    for rec in records:
        out.add_record(rec.get("usage"))
    return out


@dataclass(frozen=True)
class ReplaySummary:
    """LLM calls of one life answered from the call journal: how many, their tokens, and
    their original latency (the LLM time replay saved)."""

    usage: TokenUsage = field(default_factory=TokenUsage)

    @property
    def calls(self) -> int:
        return self.usage.calls

    @property
    def tokens(self) -> int:
        return self.usage.total

    @property
    def saved_s(self) -> float:
        return self.usage.latency_s

    def to_dict(self) -> dict[str, Any]:
        # run.json's form: the summed latency is ``saved_s``; replayed calls never failed.
        return {"calls": self.calls, **self.usage.token_counts(), "saved_s": round(self.saved_s, 3)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReplaySummary:
        return cls(TokenUsage.from_dict({**data, "latency_s": data.get("saved_s")}))


def replay_summary(records: Iterable[dict[str, Any]], since: float) -> ReplaySummary:
    """The replayed turns of records finished at or after ``since`` (one life's start)."""
    out = TokenUsage()
    for rec in records:
        if float(rec.get("finished_at") or 0.0) < since:
            continue
        for turn in rec.get("turns") or []:
            if turn.get("replayed"):
                out += TokenUsage.of_turn(turn)
    return ReplaySummary(out)
