"""Limits derived from run.max_in_flight: a user who sets only that gets that many LLM
requests in flight (checked against a real local server that reports its peak)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from matrix_hpc.config import load_config
from matrix_hpc.runtime.limits import role_limits
from matrix_hpc.runtime.spec import team_spec

from .conftest import BIN, job_config, questions, store_records, write_jsonl
from .llm_server import PeakServer


def test_unset_limits_follow_max_in_flight_and_instances() -> None:
    lim = role_limits("teacher", 1000, 3)
    assert (lim.concurrency, lim.max_connections, lim.max_outstanding_per_endpoint, lim.reachable) == (334, 334, 334, 1002)
    assert lim.warning is None
    lim = role_limits("judge", 1000, 1, uses_llm=False, max_connections=8)  # no LLM: connections do not cap it
    assert lim.concurrency == 1000 and lim.warning is None
    lim = role_limits("teacher", 50_000, 1)  # sockets stop at MAX_CONNECTIONS; tasks beyond queue for one
    assert (lim.concurrency, lim.max_connections, lim.max_outstanding_per_endpoint, lim.warning) == (50_000, 4096, 4096, None)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"concurrency": 64}, "workflow.roles.teacher.concurrency=64"),
        ({"max_connections": 64}, "llm.max_connections=64"),
        ({"max_outstanding_per_endpoint": 100, "endpoints": 2}, "llm.max_outstanding_per_endpoint=100 × 2 endpoint(s)"),
        ({"max_connections": 300, "model_key": "models.big"}, "models.big.max_connections=300"),
    ],
)
def test_explicit_limit_below_max_in_flight_warns_naming_the_key(kwargs: dict[str, Any], key: str) -> None:
    lim = role_limits("teacher", 1000, 2, **kwargs)
    assert lim.warning is not None and key in lim.warning and "run.max_in_flight=1000" in lim.warning, lim.warning
    assert lim.reachable < 1000


def test_job_warns_at_start_for_llm_roles_only(tmp_path: Path) -> None:
    cfg = load_config(job_config(tmp_path, write_jsonl(tmp_path / "d.jsonl", questions(2))), ["run.max_in_flight=500", "llm.max_connections=100"])
    said: list[str] = []
    roles = team_spec(cfg, "r", "ns", {"default": (["http://127.0.0.1:9/v1"], None)}, warn=said.append).roles
    assert roles["teacher"].concurrency == 500 and roles["teacher"].max_connections == 100 and roles["teacher"].max_outstanding == 100
    assert sorted(s.split("role ")[1].split(":")[0] for s in said) == ["'student'", "'teacher'"]  # not the inline judge
    assert all("llm.max_connections=100" in s for s in said)


@pytest.fixture
def peak_server() -> Iterator[PeakServer]:
    with PeakServer(delay_s=2.0) as server:
        yield server


@pytest.mark.slow
def test_max_in_flight_alone_reaches_the_server(tmp_path: Path, peak_server: PeakServer) -> None:
    n, max_in_flight = 400, 200
    base = questions(120)
    rows = [{**base[i % len(base)], "id": f"q{i:04d}"} for i in range(n)]
    cfg = job_config(
        tmp_path, write_jsonl(tmp_path / "data.jsonl", rows),
        **{"llm.engine": "external", "llm.base_urls": [peak_server.url], "run.max_in_flight": max_in_flight, "run.progress": "off"},
    )  # fmt: skip
    res = subprocess.run([str(BIN / "matrix-hpc"), "run", str(cfg)], capture_output=True, text=True, timeout=300, start_new_session=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "unreachable" not in res.stdout + res.stderr  # defaults never warn
    records = store_records(tmp_path / "out")
    assert sorted(r["id"] for r in records) == [r["id"] for r in rows] and all(r["status"] == "ok" for r in records)
    assert peak_server.peak >= 0.95 * max_in_flight, f"server saw at most {peak_server.peak} requests at once"
    assert peak_server.peak <= max_in_flight + 2  # backpressure still holds (+ health probes)
