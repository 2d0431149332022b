"""LLM accounting of a run: tokens, calls, errors and latency per role and per model."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Usage", "UsageSummary", "usage_summary"]


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
