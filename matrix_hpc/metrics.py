"""Prometheus metrics of a run, exported through Ray (``ray.util.metrics``).

Call sites name a metric from :data:`METRICS` and pass its tag values in order::

    metrics.inc("steps", role)
    metrics.observe("step_seconds", dt, role)

Recording only updates a local dict (a few hundred ns); a daemon thread pushes the
totals to Ray once a second (:data:`FLUSH_S`), so the hop does not pay Ray's metric
calls. Gauges that describe state (queue depth, requests outstanding) are read by
*collectors* at flush time instead of being set on every change. Ray serves the
series on each node's metrics export port, named ``ray_matrix_hpc_<name>``; every series
carries the run's id (``run_id``), so runs that share nodes or a Prometheus stay apart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["FLUSH_S", "METRICS", "MetricDef", "add_collector", "configure", "enabled", "flush", "inc", "observe", "set_gauge"]

log = logging.getLogger(__name__)

FLUSH_S = 1.0

_LATENCY = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]


@dataclass(frozen=True)
class MetricDef:
    kind: str  # counter | gauge | histogram
    help: str
    tags: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


METRICS: dict[str, MetricDef] = {
    # runtime: agent actors and the sink
    "tasks_in_flight": MetricDef("gauge", "Tasks an agent actor holds (running + queued).", ("role",)),
    "queue_depth": MetricDef("gauge", "Tasks queued in an agent actor, waiting for a worker.", ("role",)),
    "steps": MetricDef("counter", "Agent steps run.", ("role",)),
    "step_seconds": MetricDef("histogram", "Wall time of one agent step (LLM calls included).", ("role",), tuple(_LATENCY)),
    "tasks_left_role": MetricDef("counter", "Tasks that finished or failed in this role (sent to the sink).", ("role", "status", "kind")),
    "tasks_finished": MetricDef("counter", "Tasks committed to the store, by status and failure kind (ok: kind='').", ("status", "kind")),
    # LLM client (per agent actor) and service
    "llm_requests": MetricDef("counter", "LLM requests answered.", ("role", "model", "endpoint")),
    "llm_errors": MetricDef(
        "counter", "LLM request attempts that failed, by kind (http_429, http_5xx, timeout, connect, ...).", ("role", "model", "endpoint", "kind")
    ),
    "llm_latency_seconds": MetricDef("histogram", "Latency of one answered LLM request.", ("role", "model"), tuple(_LATENCY)),
    "llm_tokens": MetricDef("counter", "Tokens in (prompt) and out (completion).", ("role", "model", "direction")),
    "llm_outstanding": MetricDef("gauge", "Requests open against an endpoint from one actor.", ("role", "model", "endpoint")),
    "llm_waiting": MetricDef("gauge", "Calls in one actor waiting for a request slot.", ("role", "model")),
    "llm_replica_restarts": MetricDef("counter", "Managed LLM replica restarts.", ("model", "endpoint")),
    "llm_routing_removals": MetricDef("counter", "Endpoints taken out of routing (failed health checks or errors).", ("model", "endpoint")),
    "replayed_calls": MetricDef("counter", "LLM calls answered from the call journal on resume instead of made again (run.replay).", ("role", "model")),
    # store
    "store_commits": MetricDef("counter", "Commits of the store's writer."),
    "store_rows": MetricDef("counter", "Rows committed."),
    "store_commit_seconds": MetricDef("histogram", "Time of one commit (write + fsync).", (), (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)),
    # sandboxes
    "sandbox_leases": MetricDef("counter", "Sandbox leases granted.", ("pool",)),
    "sandbox_lease_wait_seconds": MetricDef("histogram", "Wait for a sandbox lease.", ("pool",), tuple(_LATENCY)),
    "sandbox_exec_seconds": MetricDef("histogram", "Time of one command in a sandbox.", ("pool",), tuple(_LATENCY)),
    "sandbox_recycles": MetricDef("counter", "Sandboxes recycled (max uses, failure or timeout).", ("pool", "reason")),
}

Key = tuple[str, tuple[str, ...]]


class _Recorder:
    def __init__(self) -> None:
        self.enabled = True
        self.lock = threading.Lock()
        self.flushing = threading.Lock()  # the thread and an explicit flush() (sink close) may meet
        self.counts: dict[Key, float] = {}
        self.gauges: dict[Key, float] = {}
        self.samples: dict[Key, list[float]] = {}
        self.collectors: list[Callable[[], None]] = []
        self.ray_metrics: dict[str, Any] = {}
        self.run_id = ""
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="matrix-hpc-metrics", daemon=True)
            self.thread.start()

    def _loop(self) -> None:
        while True:
            time.sleep(FLUSH_S)
            try:
                self.flush()
            except Exception:  # metrics must never take an actor down
                log.exception("metrics flush failed")

    def flush(self) -> None:
        with self.flushing:
            self._flush()

    def _flush(self) -> None:
        for collect in list(self.collectors):
            try:
                collect()
            except RuntimeError:  # a dict changed size under a collector: next second
                pass
        with self.lock:
            counts, self.counts = self.counts, {}
            gauges, self.gauges = self.gauges, {}
            samples, self.samples = self.samples, {}
        import ray

        if not ray.is_initialized():
            return
        for (name, values), v in counts.items():
            self._metric(name).inc(v, self._tags(name, values))
        for (name, values), v in gauges.items():
            self._metric(name).set(v, self._tags(name, values))
        for (name, values), vs in samples.items():
            m, tags = self._metric(name), self._tags(name, values)
            for v in vs:
                m.observe(v, tags)

    @staticmethod
    def _tags(name: str, values: tuple[str, ...]) -> dict[str, str]:
        return dict(zip(METRICS[name].tags, values))

    def _metric(self, name: str) -> Any:
        m = self.ray_metrics.get(name)
        if m is None:
            from ray.util import metrics as rm

            d = METRICS[name]
            full = f"matrix_hpc_{name}" + ("_total" if d.kind == "counter" and not name.endswith("_total") else "")
            keys = (*d.tags, "run_id")
            if d.kind == "counter":
                m = rm.Counter(full, d.help, tag_keys=keys)
            elif d.kind == "gauge":
                m = rm.Gauge(full, d.help, tag_keys=keys)
            else:
                m = rm.Histogram(full, d.help, boundaries=list(d.buckets), tag_keys=keys)
            m.set_default_tags({"run_id": self.run_id})
            self.ray_metrics[name] = m
        return m


_rec = _Recorder()


def configure(enabled: bool, run_id: str = "") -> None:
    """Turn recording on or off in this process (``run.metrics``), for run ``run_id`` (a tag of every series)."""
    _rec.enabled = enabled
    _rec.run_id = run_id


def enabled() -> bool:
    return _rec.enabled


def inc(name: str, value: float = 1.0, *tags: str) -> None:
    """Add ``value`` to counter ``name`` with tag values ``tags`` (in :data:`METRICS` order)."""
    if _rec.enabled:
        key = (name, tags)
        with _rec.lock:
            _rec.counts[key] = _rec.counts.get(key, 0.0) + value
        _rec.start()


def set_gauge(name: str, value: float, *tags: str) -> None:
    if _rec.enabled:
        with _rec.lock:
            _rec.gauges[(name, tags)] = value
        _rec.start()


def observe(name: str, value: float, *tags: str) -> None:
    """Add one observation to histogram ``name`` (pushed to Ray at the next flush)."""
    if _rec.enabled:
        key = (name, tags)
        with _rec.lock:
            bucket = _rec.samples.get(key)
            if bucket is None:
                _rec.samples[key] = [value]
            else:
                bucket.append(value)
        _rec.start()


def add_collector(fn: Callable[[], None]) -> None:
    """Call ``fn`` (which sets gauges) once per flush, from the metrics thread."""
    _rec.collectors.append(fn)
    _rec.start()


def flush() -> None:
    """Push what is recorded now (before a process ends: the thread would miss the last second)."""
    _rec.flush()


def prometheus_targets(labels: dict[str, str]) -> list[dict[str, Any]]:
    """Every live Ray node's metrics export endpoint, in Prometheus ``file_sd_configs`` form.

    Ray's own service-discovery file is written only by its dashboard, which our
    clusters do not start; the run writes this list next to its store instead.
    """
    import ray

    targets = [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")]
    return [{"targets": sorted(targets), "labels": labels}]
