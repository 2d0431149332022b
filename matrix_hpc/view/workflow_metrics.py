"""The workflow's own metrics (``workflow.metrics``, e.g. agreement rate) as a series over
the run: the function is called on each window of records in commit order, as the
index reads them, so a plot shows how they moved while the run went. A metrics
function is not additive in general, so no whole-store value is made up from the
windows; the run page shows the last life's value from ``run.json`` next to them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["WorkflowMetrics", "load_metrics_fn"]

log = logging.getLogger(__name__)

MetricsFn = Callable[[Any], dict[str, Any]]
_MAX_POINTS = 400


def load_metrics_fn(run: dict[str, Any]) -> tuple[MetricsFn | None, str | None]:
    """The metrics function ``run.json``'s config names, imported as the run imported it
    (``workflow.python_path`` from the config file's folder); (None, why) if it cannot be."""
    wf = (run.get("config") or {}).get("workflow") or {}
    path = wf.get("metrics")
    if not path:
        return None, None
    from ..runtime.loader import add_import_paths, load_object

    base = Path(run["config_file"]).parent if run.get("config_file") else Path.cwd()
    paths = [str((base / Path(p).expanduser()).resolve()) for p in wf.get("python_path") or ["."]]
    try:
        add_import_paths(paths)
        fn = load_object(str(path))
    except Exception as exc:  # the user's module may raise anything at import
        return None, f"workflow.metrics {path}: {type(exc).__name__}: {exc}"
    if not callable(fn):
        return None, f"workflow.metrics {path} is not callable"
    return fn, None


class WorkflowMetrics:
    """Feed it records in commit order; :meth:`series` gives one point per ``window`` records."""

    def __init__(self, fn: MetricsFn | None, window: int, error: str | None = None) -> None:
        self.fn = fn
        self.window = window
        self.error = error
        self.seen = 0
        self.points: list[dict[str, Any]] = []
        self._batch: list[dict[str, Any]] = []

    def feed(self, rec: dict[str, Any]) -> None:
        if self.fn is None:
            return
        self._batch.append(rec)
        self.seen += 1
        if len(self._batch) >= self.window:
            point = self._point()
            if point is not None:
                self.points.append(point)
            self._batch = []
            if len(self.points) >= _MAX_POINTS:  # a run far larger than at start: fewer, wider windows from here
                self.points = self.points[1::2]
                self.window *= 2

    def _point(self) -> dict[str, Any] | None:
        if self.fn is None or not self._batch:
            return None
        try:
            values = self.fn(iter(self._batch))
        except Exception as exc:  # the user's function: say why once and stop calling it
            self.error = f"workflow.metrics raised {type(exc).__name__}: {exc} (on records {self.seen - len(self._batch) + 1}-{self.seen})"
            log.warning("%s", self.error)
            self.fn = None
            return None
        numbers = {k: v for k, v in (values or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return {"upto": self.seen, "records": len(self._batch), "values": numbers}

    def series(self) -> dict[str, Any]:
        """The full windows, and the partial last one (recomputed each time: at most ``window`` records)."""
        points = list(self.points)
        partial = self._point()
        if partial is not None:
            points.append(partial)
        return {"window": self.window, "points": points, "error": self.error, "defined": self.fn is not None or self.error is not None}
