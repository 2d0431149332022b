"""Prometheus metrics of a real run, scraped over HTTP from Ray's metrics export port
while the run is still up; the finished-task counter must match the store."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from matrix_hpc import metrics
from matrix_hpc.config import load_config

from .conftest import job_config, questions, store_records, write_jsonl
from .llm_server import PeakServer

REPO = Path(__file__).resolve().parent.parent

SERIES = [
    "ray_matrix_hpc_tasks_finished_total",
    "ray_matrix_hpc_tasks_left_role_total",
    "ray_matrix_hpc_steps_total",
    "ray_matrix_hpc_step_seconds_bucket",
    "ray_matrix_hpc_tasks_in_flight",
    "ray_matrix_hpc_queue_depth",
    "ray_matrix_hpc_llm_requests_total",
    "ray_matrix_hpc_llm_latency_seconds_bucket",
    "ray_matrix_hpc_llm_tokens_total",
    "ray_matrix_hpc_llm_outstanding",
    "ray_matrix_hpc_llm_waiting",
    "ray_matrix_hpc_store_commits_total",
    "ray_matrix_hpc_store_rows_total",
    "ray_matrix_hpc_store_commit_seconds_bucket",
]
_SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})? ([-+\w.]+)$")


def scrape(targets: list[str]) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for target in targets:
        text = urllib.request.urlopen(f"http://{target}/metrics", timeout=10).read().decode()
        for line in text.splitlines():
            m = _SAMPLE.match(line)
            if m and m.group(1).startswith("ray_matrix_hpc_"):
                labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
                out.append((m.group(1), labels, float(m.group(3))))
    return out


def total(samples: list[tuple[str, dict[str, str], float]], name: str, **match: str) -> float:
    return sum(v for n, labels, v in samples if n == name and all(labels.get(k) == x for k, x in match.items()))


@pytest.mark.slow
def test_metrics_are_scraped_during_a_run_and_match_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matrix_hpc.job import run_job

    monkeypatch.setenv("RAY_metrics_report_interval_ms", "500")  # Ray's default (10 s) would make the test wait
    rows = questions(30) + [{"id": "bad-row", "choices": ["a", "b"], "answer": "A"}]  # fails: no 'question'
    out = tmp_path / "out"
    seen: dict[str, Any] = {}

    def on_progress(p: Any) -> None:
        # Everything is committed and the run is still up. Each process pushes its counters on
        # its own clock (the sink's and each agent actor's metrics thread, then Ray's report
        # interval), so scrape until every counter asserted below has caught up with the store,
        # not only the sink's: on a busy machine the agents' requests lagged the sink's tasks.
        if "samples" in seen or p.total is None or p.done < p.total:
            return
        records = store_records(out)
        want = [
            ("ray_matrix_hpc_tasks_finished_total", {}, len(records)),
            ("ray_matrix_hpc_llm_requests_total", {}, sum(len(r["turns"]) for r in records)),
            ("ray_matrix_hpc_llm_tokens_total", {"direction": "out"}, sum(r["usage"]["completion_tokens"] for r in records)),
        ]
        targets = [t for group in json.loads((out / "prometheus_targets.json").read_text()) for t in group["targets"]]
        deadline = time.monotonic() + 60
        while True:
            samples = scrape(targets)
            if all(total(samples, name, **match) >= n for name, match, n in want) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        seen.update(samples=samples, done=p.done)

    with PeakServer(delay_s=0.05) as server:
        cfg = job_config(
            tmp_path, write_jsonl(tmp_path / "data.jsonl", rows), **{"llm.engine": "external", "llm.base_urls": [server.url], "run.progress": "off"}
        )
        summary = run_job(load_config(cfg), on_progress=on_progress)
    assert summary.progress.finished and "samples" in seen
    samples = seen["samples"]
    names = {n for n, _, _ in samples}
    assert not [s for s in SERIES if s not in names], sorted(names)
    records = store_records(out)
    assert len(records) == 31
    assert total(samples, "ray_matrix_hpc_tasks_finished_total") == len(records)
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    assert {labels.get("run_id") for _, labels, _ in samples} == {run_id}  # every series names its run
    assert total(samples, "ray_matrix_hpc_tasks_finished_total", status="failed", kind="bad_input") == 1
    assert total(samples, "ray_matrix_hpc_store_rows_total") == len(records)
    turns = sum(len(r["turns"]) for r in records)
    assert total(samples, "ray_matrix_hpc_llm_requests_total", role="teacher", model="default", endpoint=server.url) > 0
    assert total(samples, "ray_matrix_hpc_llm_requests_total") == turns
    out_tokens = sum(r["usage"]["completion_tokens"] for r in records)
    assert total(samples, "ray_matrix_hpc_llm_tokens_total", direction="out") == out_tokens


def test_recording_is_local_until_flushed_and_can_be_off() -> None:
    before = dict(metrics._rec.counts)
    metrics.configure(False)
    try:
        metrics.inc("steps", 1, "x")
        assert metrics._rec.counts == before  # off: nothing recorded (the without-metrics benchmark row)
    finally:
        metrics.configure(True)
    metrics.inc("steps", 2, "x")
    metrics.inc("steps", 3, "x")
    metrics.observe("step_seconds", 0.5, "x")
    assert metrics._rec.counts[("steps", ("x",))] == 5 and metrics._rec.samples[("step_seconds", ("x",))] == [0.5]
    metrics.flush()  # no Ray here: dropped, not raised
    assert ("steps", ("x",)) not in metrics._rec.counts
    assert set(metrics.METRICS) >= {"replayed_calls", "sandbox_leases", "llm_replica_restarts", "llm_routing_removals"}


def test_dashboard_shows_only_defined_metrics_and_every_one_but_the_per_role_exits() -> None:
    text = (REPO / "docs" / "grafana" / "matrix-hpc.json").read_text()
    dash = json.loads(text)
    used = set(re.findall(r"ray_matrix_hpc_(\w+?)(?:_total|_bucket)?\b", text))
    assert used <= set(metrics.METRICS), used - set(metrics.METRICS)
    assert set(metrics.METRICS) - used == {"tasks_left_role"}
    assert all(p["type"] == "row" or p["targets"] for p in dash["panels"])
