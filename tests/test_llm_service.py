"""The managed LLM service end to end: real Ray, real embedded engines, real runs.

Two replicas: load spreads, a task's turns stick to one replica, and a replica
killed mid-run drains to the other. ``serve`` and ``check-health`` work on the
same machinery; an external endpoint that is down leaves routing, and its API
key is used but never written to disk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from matrix_hpc.procs import pid_alive
from matrix_hpc.services.llm import EmbeddedEngine
from matrix_hpc.services.llm.embedded import free_port

from .conftest import BIN, committed_rows, job_config, questions, store_records, wait_for, write_jsonl
from .llm_server import PeakServer

pytestmark = pytest.mark.slow


def _run_info(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / "run.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def test_two_replicas_spread_stick_and_drain(tmp_path: Path, run_factory: Any) -> None:
    rows = questions(40)  # 15 before the kill, the rest on the survivor (one thread: ~2 s a call on CI)
    cfg = job_config(
        tmp_path, write_jsonl(tmp_path / "data.jsonl", rows),
        **{"llm.replicas": 2, "llm.max_restarts": 0, "llm.health_interval_s": 0.5, "llm.embedded.n_parallel": 4,
           "llm.embedded.threads": 1, "llm.max_retries": 3, "llm.retry_backoff_s": 0.2, "workflow.params.max_turns": 3},
    )  # fmt: skip
    out = tmp_path / "out"
    run = run_factory(cfg)
    wait_for(lambda: committed_rows(out) >= 15 and len(_run_info(out).get("llm") or []) == 2, 300, "15 commits", run)
    survivor, victim = _run_info(out)["llm"]
    killed_at = time.time()
    os.kill(victim["pid"], signal.SIGKILL)
    assert run.wait(400) == 0, run.output

    records = store_records(out)
    assert sorted(r["id"] for r in records) == sorted(q["id"] for q in rows)
    turns = [t for r in records for t in r["turns"] if t["endpoint"]]
    before = Counter(t["endpoint"] for t in turns if t["started_at"] < killed_at)
    split = {url: before[url] for url in (survivor["url"], victim["url"])}
    print(f"turns per replica before the kill: {split}")
    assert min(split.values()) >= 0.25 * sum(split.values()), f"load did not spread: {split}"

    # Sticky: every task that ran entirely before the kill used one replica for all its turns.
    finished_before = [r for r in records if r["finished_at"] < killed_at]
    assert finished_before
    mixed = [r["id"] for r in finished_before if len({t["endpoint"] for t in r["turns"] if t["endpoint"]}) > 1]
    assert not mixed, f"turns of {mixed} went to different replicas"

    # Drain: once the registry saw the kill, every call went to the survivor.
    after = Counter(t["endpoint"] for t in turns if t["started_at"] > killed_at + 3.0)
    assert after and set(after) == {survivor["url"]}, after
    for rec in records:
        if rec["status"] == "failed":
            assert rec["error"]["kind"] == "llm_unavailable" and victim["url"] in rec["error"]["message"], rec["error"]
    states = {e["url"]: e for e in _run_info(out)["llm"]}
    assert states[victim["url"]]["state"] == "failed" and states[survivor["url"]]["state"] == "up", states

    # Token accounting: per role and per model, over the whole store, in run.json and the summary.
    usage = _run_info(out)["usage"]
    assert set(usage["by_role"]) == {"teacher", "student"} and set(usage["by_model"]) == {"default"}
    assert sum(c["calls"] for c in usage["by_role"].values()) == len(turns) == usage["by_model"]["default"]["calls"]
    assert usage["by_model"]["default"]["completion_tokens"] == sum(t["completion_tokens"] for t in turns)
    assert "role teacher:" in run.output and "model default:" in run.output


def test_serve_prints_endpoints_and_check_health_probes_them(tmp_path: Path, run_factory: Any) -> None:
    cfg = job_config(tmp_path, write_jsonl(tmp_path / "data.jsonl", questions(2)), **{"llm.replicas": 2, "llm.embedded.threads": 1})
    out = tmp_path / "out"
    serve = run_factory(cfg, command="serve")
    wait_for(lambda: "Ctrl-C stops the service" in serve.output, 120, "serve ready", serve)
    endpoints = json.loads((out / "services.json").read_text())["llm"]
    assert len(endpoints) == 2 and all(e["url"] in serve.output for e in endpoints)

    ok = subprocess.run([str(BIN / "matrix-hpc"), "check-health", str(out)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "2/2 endpoints generate" in ok.stdout, ok.stdout + ok.stderr
    # The endpoints take the run's key: serve says where it is (a 0600 file), never what it is;
    # check-health reads it from there; a probe without it is refused.
    key_file = Path(endpoints[0]["api_key_file"])
    assert all(e["api_key_file"] == str(key_file) for e in endpoints) and key_file.stat().st_mode & 0o777 == 0o600
    assert f"in {key_file} (readable by you only)" in serve.output and key_file.read_text().strip() not in serve.output
    keyless = subprocess.run(
        [str(BIN / "matrix-hpc"), "check-health", "--url", endpoints[0]["url"], "--timeout", "30"], capture_output=True, text=True, timeout=60
    )
    assert keyless.returncode == 1 and f"FAIL  {endpoints[0]['url']}" in keyless.stdout, keyless.stdout + keyless.stderr
    dead = f"http://127.0.0.1:{free_port()}/v1"
    bad = subprocess.run([str(BIN / "matrix-hpc"), "check-health", "--url", dead, "--timeout", "5"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and f"FAIL  {dead}" in bad.stdout, bad.stdout + bad.stderr

    serve.proc.send_signal(signal.SIGINT)
    assert serve.wait(60) == 0, serve.output
    assert "service stopped" in serve.output
    assert not any(pid_alive(e["pid"]) for e in endpoints) and not key_file.exists()


def test_external_endpoint_down_leaves_routing_and_key_is_never_saved(tmp_path: Path, run_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sekrit-" + os.urandom(6).hex()
    monkeypatch.setenv("TEST_LLM_KEY", secret)
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with EmbeddedEngine(n_parallel=8, log_dir=tmp_path) as engine:
        engine.wait_ready(60)
        rows = questions(16)
        cfg = job_config(
            tmp_path, write_jsonl(tmp_path / "data.jsonl", rows),
            **{"llm.engine": "external", "llm.base_urls": [engine.base_url, dead], "llm.api_key_env": "TEST_LLM_KEY",
               "llm.health_interval_s": 0.5, "llm.retry_backoff_s": 0.2},
        )  # fmt: skip
        run = run_factory(cfg)
        assert run.wait(300) == 0, run.output
    out = tmp_path / "out"
    records = store_records(out)
    assert sorted(r["id"] for r in records) == sorted(q["id"] for q in rows)
    assert all(r["status"] == "ok" for r in records), [r["error"] for r in records if r["error"]]
    states = {e["url"]: e["state"] for e in _run_info(out)["llm"]}
    assert states == {engine.base_url: "up", dead: "down"}, states
    leaked = [p for p in out.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaked and "TEST_LLM_KEY" in (out / "run.json").read_text()


def test_external_endpoint_answering_null_to_probes_is_routed_only_once_it_generates(tmp_path: Path, run_factory: Any) -> None:
    """A 200 whose body is not an object fails that probe (it used to raise inside the
    registry: the run could not start, or the endpoint's health loop ended silently), and
    agents' clients route to an external endpoint only once a probe passed."""
    rows = questions(8)
    with PeakServer(delay_s=0.01, bad_probes=3) as server:
        cfg = job_config(
            tmp_path, write_jsonl(tmp_path / "data.jsonl", rows),
            **{"llm.engine": "external", "llm.base_urls": [server.url], "llm.health_interval_s": 0.5, "llm.health_failures": 1},
        )  # fmt: skip
        run = run_factory(cfg)
        assert run.wait(120) == 0, run.output
    records = store_records(tmp_path / "out")
    assert sorted(r["id"] for r in records) == sorted(q["id"] for q in rows)
    assert all(r["status"] == "ok" for r in records), [r["error"] for r in records if r["error"]]
    assert server.probes > 3 and server.first_good_probe_at is not None and server.first_chat_at is not None
    assert server.first_chat_at >= server.first_good_probe_at, (server.first_chat_at, server.first_good_probe_at)


def test_busy_replica_whose_probes_time_out_is_not_restarted(tmp_path: Path, run_factory: Any) -> None:
    # One slot and 16 tasks in flight: every probe queues behind a dozen real generations and
    # times out (1 s) while requests keep completing. Busy, not dead: no restart, no removal.
    rows = questions(24)
    cfg = job_config(
        tmp_path, write_jsonl(tmp_path / "data.jsonl", rows),
        **{"llm.embedded.n_parallel": 1, "llm.embedded.threads": 1, "llm.max_tokens": 8, "llm.timeout_s": 120.0,
           "llm.health_interval_s": 0.5, "llm.health_timeout_s": 1.0, "llm.health_failures": 2},
    )  # fmt: skip
    out = tmp_path / "out"
    run = run_factory(cfg)
    assert run.wait(600) == 0, run.output
    records = store_records(out)
    assert sorted(r["id"] for r in records) == sorted(q["id"] for q in rows)
    assert all(r["status"] == "ok" for r in records), [r["error"] for r in records if r["error"]]
    (endpoint,) = _run_info(out)["llm"]
    assert endpoint["restarts"] == 0 and endpoint["starts"] == 1 and endpoint["state"] == "up", endpoint
    assert endpoint["slow_probes"] >= 2, endpoint  # the probes did time out behind the queue
    assert endpoint["completed"] >= len(rows), endpoint
    assert "was restarted" not in run.output


def test_completion_pace_widens_the_busy_window_boundedly() -> None:
    """A server completing one request every 4 s (one slot on a loaded machine) stays 'busy'
    for twice that after its last completion; a steady fast server adds little; the slack is
    bounded so a hung server is still restarted."""
    from matrix_hpc.services.llm.registry import CompletionPace

    slow = CompletionPace()
    for t in (0.0, 4.0, 8.0, 12.0):
        slow.observe(t)
    assert slow.slack_s() == 8.0
    fast = CompletionPace()
    for t in (0.0, 0.1, 0.2, 0.3):
        fast.observe(t)
    assert fast.slack_s() < 0.25
    hung_after_slow = CompletionPace()
    hung_after_slow.observe(0.0)
    hung_after_slow.observe(1000.0)
    assert hung_after_slow.slack_s() == CompletionPace.MAX_SLACK_S
    assert CompletionPace().slack_s() == 0.0
    # No completion yet (the first requests queue behind one slot): excused for the slowest
    # pace's slack from when the endpoint came up, then not (a replica hung from its start).
    first = CompletionPace(since=100.0)
    assert first.busy(now=100.0 + CompletionPace.MAX_SLACK_S, probe_s=1.0)
    assert not first.busy(now=102.0 + CompletionPace.MAX_SLACK_S, probe_s=1.0)
    first.observe(130.0)  # then its pace decides
    assert first.busy(now=133.0, probe_s=1.0) and not first.busy(now=140.0, probe_s=1.0)
