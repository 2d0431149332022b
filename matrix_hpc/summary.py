"""End-of-run accounting read from the store, without rescanning it every time.

A part's committed rows never change, so the store's counts and usage are added up
incrementally: the previous life's totals (in run.json, with the row marks they
cover) plus the rows committed since those marks. A life killed before it wrote its
totals leaves the older totals and marks in place, so nothing is counted twice.
The workflow's metrics are not additive in general (a rate, a mean): they are computed
over every committed record, one scan of the store per life's end, so a number labelled
``store:`` covers the whole store after a resume too (it once covered the last life only).
Every figure counts current records only (one per id: a retried record replaces its
failed one, see :mod:`matrix_hpc.store.latest`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .runtime.usage import UsageSummary, usage_summary
from .store import StoreReader

__all__ = ["StoreSummary", "summarize"]

_ADDITIVE = ("records", "ok", "failed", "prompt_tokens", "completion_tokens")


@dataclass
class StoreSummary:
    upto: dict[str, int]
    """Committed rows per part that ``store`` and ``usage`` cover."""
    store: dict[str, Any]
    usage: UsageSummary
    metrics: dict[str, Any] = field(default_factory=dict)


def summarize(
    root: Path,
    prev_upto: dict[str, int] | None,
    prev_store: dict[str, Any],
    prev_usage: UsageSummary,
    metrics_fn: Callable[..., dict[str, Any]] | None,
) -> StoreSummary:
    reader = StoreReader(root)
    upto = reader.committed()
    since = prev_upto if prev_upto and prev_store else None
    if since is not None and any(upto.get(p, 0) < n for p, n in since.items()):
        since = None  # a store that shrank is not the one summarized: read it all once
    if since is not None and reader.replaced_since(since, upto):
        since = None  # retried records replaced some the totals counted: count current ones again
    counts = reader.counts(since)
    usage = usage_summary(reader.iter_records(since=since, upto=upto))
    if since is not None:
        counts = _add_counts(prev_store, counts)
        usage = prev_usage + usage
    metrics = metrics_fn(reader.iter_records(upto=upto)) if metrics_fn else {}
    return StoreSummary(upto=upto, store=counts, usage=usage, metrics=metrics)


def _add_counts(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: int(base.get(k, 0)) + int(new.get(k, 0)) for k in _ADDITIVE}
    kinds = dict(base.get("failed_by_kind") or {})
    for kind, n in new["failed_by_kind"].items():
        kinds[kind] = kinds.get(kind, 0) + n
    out["failed_by_kind"] = dict(sorted(kinds.items(), key=lambda kv: -kv[1]))
    return out
