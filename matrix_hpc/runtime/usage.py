"""LLM accounting of a run: tokens, calls, errors and latency per role and per model; what replay saved."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ReplaySummary", "Usage", "UsageSummary", "replay_summary", "usage_summary"]


@dataclass
class Usage:
    """One role's or one model's LLM calls, added up over records."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    errors: int = 0
    """Calls that failed for good (after retries)."""
    latency_s: float = 0.0
    """Summed over calls; see :attr:`mean_latency_s`."""

    @property
    def mean_latency_s(self) -> float:
        return self.latency_s / self.calls if self.calls else 0.0

    def add(self, counts: dict[str, Any]) -> None:
        self.prompt_tokens += int(counts.get("prompt_tokens", 0))
        self.completion_tokens += int(counts.get("completion_tokens", 0))
        self.calls += int(counts.get("calls", 0))
        self.errors += int(counts.get("errors", 0))
        self.latency_s += float(counts.get("latency_s", 0.0))


@dataclass
class UsageSummary:
    by_role: dict[str, Usage] = field(default_factory=dict)
    by_model: dict[str, Usage] = field(default_factory=dict)

    def to_dict(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Plain data for run.json (with each entry's mean latency, for readers of the file)."""
        return {
            section: {name: {**asdict(u), "mean_latency_s": round(u.mean_latency_s, 4)} for name, u in getattr(self, section).items()}
            for section in ("by_role", "by_model")
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> UsageSummary:
        out = cls()
        for section in ("by_role", "by_model"):
            for name, counts in ((data or {}).get(section) or {}).items():
                getattr(out, section).setdefault(name, Usage()).add(counts)
        return out


def usage_summary(records: Iterable[dict[str, Any]]) -> UsageSummary:
    """Add up each record's ``usage.by_role`` / ``usage.by_model`` (failed records included: they cost tokens too)."""
    out = UsageSummary()
    for rec in records:
        usage = rec.get("usage") or {}
        for section in ("by_role", "by_model"):
            acc = getattr(out, section)
            for name, counts in (usage.get(section) or {}).items():
                acc.setdefault(name, Usage()).add(counts)
    return out


@dataclass
class ReplaySummary:
    """LLM calls of one life answered from the call journal: how many, their tokens, and
    their original latency (the LLM time replay saved)."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    saved_s: float = 0.0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "saved_s": round(self.saved_s, 3)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReplaySummary:
        return cls(**{k: data[k] for k in ("calls", "prompt_tokens", "completion_tokens", "saved_s") if k in data})


def replay_summary(records: Iterable[dict[str, Any]], since: float) -> ReplaySummary:
    """The replayed turns of records finished at or after ``since`` (one life's start)."""
    out = ReplaySummary()
    for rec in records:
        if float(rec.get("finished_at") or 0.0) < since:
            continue
        for turn in rec.get("turns") or []:
            if turn.get("replayed"):
                out.calls += 1
                out.prompt_tokens += int(turn.get("prompt_tokens", 0))
                out.completion_tokens += int(turn.get("completion_tokens", 0))
                out.saved_s += float(turn.get("latency_s", 0.0))
    return out
