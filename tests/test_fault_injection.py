"""Fault injection (issue 11): one long collaborative-reasoning run, many SIGKILLs.

The run (``MATRIX_FAULT_TASKS`` tasks, 20,000 by default) talks to the latency-model
engine (``benchmarks/latency_engine.py``, a benchmark instrument standing in for a GPU
server) while the test SIGKILLs, at times drawn from a logged seed, the driver (then
re-runs the same command), agent actors, the sink, the endpoint registry and the
engine process (restarted on its port), at least 25 times in all, and fills the
output disk once (a real tmpfs). At the end every input id is in the store exactly
once, no record failed, every life ended within its bound, and the number of tasks
that had to be redone is printed. ``MATRIX_FAULT_SEED`` replays a schedule.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import QUESTIONS, REPO, Run, actor_pids, committed_rows, fill, store_records, tmpfs, wait_for, write_jsonl

pytestmark = pytest.mark.slow

N = int(os.environ.get("MATRIX_FAULT_TASKS", "20000"))
LIFE_S = 240  # no life of the run may take longer than this (a hang fails the test)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Engine:
    """The latency-model engine as its own process; killed and restarted on one port."""

    def __init__(self, port: int, log: Path) -> None:
        self.port, self.log = port, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        args = [sys.executable, "-m", "benchmarks.latency_engine", "--port", str(self.port), "--a", "0.001", "--max-batch", "512", "--out-mean", "8"]
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(args, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"latency engine did not listen on {self.port}: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


def dataset(tmp: Path, n: int) -> Path:
    base = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]
    return write_jsonl(tmp / "data.jsonl", [{**base[i % len(base)], "id": f"q{i}"} for i in range(n)])


def config(tmp: Path, out: Path, port: int) -> Path:
    cfg = yaml.safe_load((REPO / "workflows" / "collab_reasoning" / "config.yaml").read_text())
    cfg["dataset"] = {"path": str(dataset(tmp, N)), "required_fields": ["question", "choices", "answer"]}
    cfg["llm"] = {
        "engine": "external",
        "base_urls": [f"http://127.0.0.1:{port}/v1"],
        "max_tokens": 16,
        "timeout_s": 10.0,
        "max_retries": 8,
        "retry_backoff_s": 0.2,
        "health_interval_s": 0.5,
        "max_outstanding_per_endpoint": 512,
    }
    cfg["workflow"]["params"]["max_turns"] = 2
    for role in ("teacher", "student"):
        cfg["workflow"]["roles"][role].update(instances=2, concurrency=256)
    cfg["output"] = {"path": str(out), "flush_interval_s": 0.5, "chunk_rows": 1024, "fsync": False}
    cfg["run"] = {
        "max_in_flight": 1024,
        "batch_size": 128,
        "max_attempts": 20,
        "health_interval_s": 0.5,
        "stall_timeout_s": 60.0,
        "max_actor_restarts": 1000,
        "stop_grace_s": 1.0,
        "progress": "log",
        "progress_interval_s": 5.0,
    }
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_info(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return {}


def live(run: Run, out: Path, run_id: str | None) -> dict[str, Any]:
    """Wait until a life other than ``run_id`` is running; its run.json."""
    wait_for(lambda: run_info(out).get("status") == "running" and run_info(out).get("run_id") != run_id, LIFE_S, "the run to be running", run)
    return run_info(out)


@pytest.fixture
def disk(tmp_path: Path) -> Any:
    with tmpfs(tmp_path, "256m") as mnt:
        yield mnt


def test_many_sigkills_and_a_full_disk_lose_and_duplicate_nothing(tmp_path: Path, disk: Path) -> None:
    seed = int(os.environ.get("MATRIX_FAULT_SEED", str(random.SystemRandom().randrange(10**6))))
    print(f"\nfault injection seed {seed} (replay: MATRIX_FAULT_SEED={seed}), {N} tasks")
    rng = random.Random(seed)
    plan = ["driver"] * 3 + ["agent"] * 12 + ["sink"] * 4 + ["registry"] * 3 + ["engine"] * 3 + ["disk"]
    rng.shuffle(plan)
    out = disk / "out"
    engine = Engine(free_port(), tmp_path / "engine.log")
    cfg = config(tmp_path, out, engine.port)
    env_path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    os.environ["PYTHONPATH"], old_path = env_path, os.environ.get("PYTHONPATH")
    runs: list[Run] = []
    done: Counter[str] = Counter()
    t0 = time.monotonic()
    try:
        runs.append(Run(cfg, log=tmp_path / "life0.log"))
        info = live(runs[-1], out, None)
        life_started = time.monotonic()
        step, progress_mark = max(10, N // 200), 0
        for what in plan:  # (grows by a fault that found no target)
            if len(plan) > 60:
                break
            run = runs[-1]
            # Faults are spread over the run: each waits for some progress (a hang fails here).
            wait_for(
                lambda: committed_rows(out) >= progress_mark + step or run.proc.poll() is not None,
                LIFE_S,
                f"progress before fault {sum(done.values())} ({what})",
                run if run.proc.poll() is None else None,
            )
            progress_mark = committed_rows(out)
            time.sleep(rng.uniform(0.0, 1.0))
            if run.proc.poll() is not None:
                break  # finished early: the remaining faults cannot be injected (asserted below)
            assert time.monotonic() - life_started < LIFE_S, f"life {len(runs) - 1} ran over {LIFE_S}s"
            if what == "driver":
                run.kill()
                run.cleanup()
                runs.append(Run(cfg, log=tmp_path / f"life{len(runs)}.log"))
                info = live(runs[-1], out, info.get("run_id"))
                life_started = time.monotonic()
            elif what in ("agent", "sink", "registry"):
                cls = {"agent": "AgentActor", "sink": "SinkActor", "registry": "EndpointRegistry"}[what]
                pids = actor_pids(run, cls)
                if not pids:  # restarting just now: try this fault again at the end
                    plan.append(what)
                    continue
                os.kill(rng.choice(pids), signal.SIGKILL)
            elif what == "engine":
                engine.kill()
                time.sleep(rng.uniform(0.2, 1.0))
                engine.start()
            elif what == "disk":
                filler = fill(disk)
                time.sleep(rng.uniform(2.0, 4.0))
                filler.unlink(missing_ok=True)
            done[what] += 1
        print(f"faults injected: {dict(done)} ({sum(done.values())} in all) in {time.monotonic() - t0:.0f}s")
        rc = runs[-1].wait(LIFE_S * 2)
        assert rc == 0, runs[-1].output[-4000:]
    finally:
        for r in runs:
            r.cleanup()
        engine.stop()
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path

    records = store_records(out)
    counts = Counter(r["id"] for r in records)
    assert not [i for i, c in counts.items() if c > 1], "duplicate ids in the store"
    assert set(counts) == {f"q{i}" for i in range(N)}
    failed = [r["error"] for r in records if r["status"] != "ok"]
    assert not failed, f"{len(failed)} failed records, e.g. {failed[:3]} (seed {seed})"
    kills = sum(n for k, n in done.items() if k != "disk")
    assert kills >= 25 and done["disk"] == 1, f"only {dict(done)} injected before the run finished (seed {seed})"
    history = run_info(out)["history"]
    resent = sum(r["attempt"] - 1 for r in records)  # lost with a killed actor or sink, re-sent within a life
    cut = done["driver"]  # each driver kill abandons what was in flight; the next life does it again
    print(
        f"{N} tasks, {len(history)} lives, {kills} SIGKILLs + 1 full disk in {time.monotonic() - t0:.0f}s; tasks redone: "
        f"{resent} re-sent within a life, and at most {cut} x run.max_in_flight started again after the {cut} driver kills"
    )
