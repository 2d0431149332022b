"""What the run page shows: the run's state and progress, counts, LLM accounting, plot data.

The state is ``matrix-hpc status``'s (:func:`~matrix_hpc.run_state.run_state` over
``run.json``). Its evidence of a live writer is the writer *lease* here, not the
``flock`` that ``status`` probes: the viewer polls, and a probe that takes the lock
even for a moment could make a starting writer's non-blocking lock fail; the lease is
also what tells a live writer on another host, as a login node sees it.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..run_state import process_running, run_state
from ..runinfo import RunInfo
from ..store.fsutil import WriterLease, read_json
from ..store.layout import PartLayout, RunLayout
from .index import StoreIndex
from .workflow_metrics import WorkflowMetrics

__all__ = ["RunFile", "run_summary", "writer_active"]

_TIME_POINTS = 240  # points of the records-over-time line


class RunFile:
    """``run.json``, read again only when it changed."""

    def __init__(self, root: Path) -> None:
        self.path = RunLayout(root).run_json
        self._stamp: tuple[int, int] | None = None
        self.raw: dict[str, Any] = {}

    def read(self) -> dict[str, Any]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self.raw, self._stamp = {}, None
            return self.raw
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                self.raw = read_json(self.path, {}) or {}
                self._stamp = stamp
            except ValueError:  # being replaced on a file system without atomic rename: keep the last
                pass
        return self.raw


def writer_active(ix: StoreIndex) -> bool:
    """A part's writer lease is live (renewed, not released; on this host, its process runs)."""
    here = socket.gethostname()
    for part in ix.parts:
        lease = WriterLease.read(PartLayout(part.dir).lease)
        if lease is not None and lease.live() and not (lease.host == here and not process_running(lease.pid)):
            return True
    return False


def _timeline(finished: np.ndarray) -> list[list[float]]:
    """(time, records finished by then) at up to ``_TIME_POINTS`` points."""
    if not len(finished):
        return []
    ts = np.sort(finished)
    idx = np.unique(np.linspace(0, len(ts) - 1, min(len(ts), _TIME_POINTS)).astype(np.int64))
    return [[float(ts[i]), int(i) + 1] for i in idx]


def _counts(ix: StoreIndex, arrays: dict[str, np.ndarray], numeric: bool) -> dict[str, Any]:
    cur = arrays["current"]  # current records only, as every reader counts (store.latest)
    arrays = {k: arrays[k][cur] for k in ("status", "kind", "prompt_tokens", "completion_tokens")}
    status = (
        np.bincount(arrays["status"].astype(np.int64), minlength=len(ix.status.names)) if len(arrays["status"]) else np.zeros(len(ix.status.names), np.int64)
    )
    by_status = {name: int(status[i]) for i, name in enumerate(ix.status.names) if status[i]}
    failed = ix.status.code("failed")
    kinds: dict[str, int] = {}
    if failed is not None:
        k = arrays["kind"][arrays["status"] == failed].astype(np.int64)
        counts = np.bincount(k, minlength=len(ix.kind.names)) if len(k) else np.zeros(0, np.int64)
        kinds = {ix.kind.names[i] or "unknown": int(c) for i, c in sorted(enumerate(counts), key=lambda ic: -ic[1]) if c}
    return {
        "records": int(len(arrays["status"])),
        "ok": by_status.get("ok", 0),
        "failed": by_status.get("failed", 0),
        "by_status": by_status,
        "failed_by_kind": kinds,
        "prompt_tokens": int(arrays["prompt_tokens"].sum()) if numeric else None,
        "completion_tokens": int(arrays["completion_tokens"].sum()) if numeric else None,
    }


def run_summary(ix: StoreIndex, run_file: RunFile, metrics: WorkflowMetrics, cache: dict[str, Any]) -> dict[str, Any]:
    """The run page's data (``cache`` keeps the timeline between calls that add no rows)."""
    raw = run_file.read()
    info = RunInfo.from_dict(raw) if raw else None
    active = writer_active(ix)
    state = run_state(info, active) if info else ("running now" if active else "unknown (no run.json)")
    arrays = ix.arrays()
    numeric = ix.numeric_ready  # else tokens and times are still loading (a moment after new rows)
    if numeric and cache.get("timeline_version") != (ix.generation, ix.version):
        cache["timeline"] = _timeline(arrays["finished_at"])
        cache["timeline_version"] = (ix.generation, ix.version)
    faceted = arrays["faceted"]
    turns = np.bincount(arrays["turns"][faceted].astype(np.int64)).tolist() if faceted.any() else []
    run = {k: raw.get(k) for k in ("run_id", "status", "dataset", "input_rows", "started_at", "finished_at", "host", "config_file")}
    lives = [h.to_dict() for h in info.history] if info else []
    return {
        "output": str(ix.root),
        "now": time.time(),
        "state": state,
        "writer_active": active,
        "running": active or state.startswith(("running", "starting")),
        "run": run,
        "lives": lives,
        "counts": _counts(ix, arrays, numeric),
        "indexed": ix.n,
        "committed": ix.committed_total,
        "faceted": ix.faceted,
        "usage": ix.aggregates.to_dict(),
        "replayed_calls": int(arrays["replayed"].sum()),
        "last_replay": raw.get("replay"),
        "timeline": cache.get("timeline", []),
        "turns_hist": turns,
        "metrics": metrics.series(),
        "run_metrics": raw.get("metrics") or {},
        "vocab": {
            "status": sorted(n for n in ix.status.names if n),
            "kind": sorted(n for n in ix.kind.names if n),
            "role": sorted(ix.roles.names),
            "model": sorted(ix.models.names),
        },
        "index_bytes": ix.nbytes(),
    }
