"""Token accounting of a run: tokens and calls per role and per model, and what replay saved."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["replay_summary", "usage_summary"]


def usage_summary(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, dict[str, int]]]:
    """Add up each record's ``usage.by_role`` / ``usage.by_model`` (failed records included: they cost tokens too)."""
    out: dict[str, dict[str, dict[str, int]]] = {"by_role": {}, "by_model": {}}
    for rec in records:
        usage = rec.get("usage") or {}
        for section in ("by_role", "by_model"):
            for name, counts in (usage.get(section) or {}).items():
                acc = out[section].setdefault(name, {"prompt_tokens": 0, "completion_tokens": 0, "calls": 0})
                for k in acc:
                    acc[k] += int(counts.get(k, 0))
    return out


def replay_summary(records: Iterable[dict[str, Any]], since: float) -> dict[str, Any]:
    """LLM calls answered from the journal in records finished at or after ``since`` (one life):
    how many, their tokens and their original latency (the LLM time they saved)."""
    out: dict[str, Any] = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "saved_s": 0.0}
    for rec in records:
        if float(rec.get("finished_at") or 0.0) < since:
            continue
        for turn in rec.get("turns") or []:
            if turn.get("replayed"):
                out["calls"] += 1
                out["prompt_tokens"] += int(turn.get("prompt_tokens", 0))
                out["completion_tokens"] += int(turn.get("completion_tokens", 0))
                out["saved_s"] += float(turn.get("latency_s", 0.0))
    out["saved_s"] = round(out["saved_s"], 3)
    return out
