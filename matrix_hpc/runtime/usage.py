"""Token accounting of a run: prompt/completion tokens and calls per role and per model."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["usage_summary"]


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
