"""Time from SIGTERM to the commit that makes every task finished before it durable.

Runs the real ``matrix-hpc run`` (``python -m matrix_hpc.cli`` from ``--repo``: another
checkout measures the code before a change) on a no-LLM relay job that keeps
``--in-flight`` tasks in flight: each task sleeps ~``in_flight / --rate`` s, so about
``--rate`` tasks finish each second and the sink always holds rows not yet committed.
The agents' ``close()`` takes ``--close-s`` (a slow clean-up). Once that many tasks are
in flight (and ``--settle-s`` later), it sends SIGTERM with ``run.stop_grace_s=0`` (what Slurm's TERM means:
abandon what is in flight, save the rest) and watches ``commit.json`` (its
``updated_at`` is written after the chunks are fsynced).

"TERM -> durable" is the time until the first commit that holds every record whose
``finished_at`` is before the TERM; "TERM -> exit" is when the driver is gone. Prints
one table row per size.

    python -m benchmarks.term_latency --in-flight 5000 50000
    python -m benchmarks.term_latency --in-flight 50000 --repo /tmp/before   # a checkout of the code before
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from matrix_hpc.agents import Agent, Task

REPO = Path(__file__).resolve().parent.parent


class SlowCloseRelay(Agent):
    """Finishes each task after ``uniform(0, 2 * sleep_s)``; ``close()`` takes ``close_s``."""

    uses_llm = False

    async def step(self, task: Task) -> None:
        import random

        await asyncio.sleep(random.uniform(0, 2 * float(self.params["sleep_s"])))
        task.finish({"ok": True})

    async def close(self) -> None:
        await asyncio.sleep(float(self.params["close_s"]))


def _watch_commits(commit: Path, stop: threading.Event, seen: list[tuple[int, float]]) -> None:
    """Note each commit (rows, updated_at) as it appears."""
    last = None
    while not stop.is_set():
        try:
            data = json.loads(commit.read_text())
            cur = (int(data["rows"]), float(data["updated_at"]))
            if cur != last:
                seen.append(cur)
                last = cur
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)


def one(in_flight: int, rate: float, close_s: float, flush_s: float, settle_s: float, repo: Path, tmp: Path) -> dict[str, Any]:
    n = 2 * in_flight + int(rate * (settle_s + 120))  # the window stays full until the TERM
    data = tmp / "data.jsonl"
    with open(data, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"t{i}"}) + "\n")
    out = tmp / "out"
    cfg = {
        "workflow": {
            "name": "term",
            "entry": "a",
            "roles": {"a": {"agent": "benchmarks.term_latency:SlowCloseRelay", "instances": 2, "params": {"sleep_s": in_flight / rate, "close_s": close_s}}},
        },
        "dataset": {"path": str(data)},
        "llm": {"engine": "external", "base_urls": ["http://127.0.0.1:9/v1"]},
        "output": {"path": str(out), "chunk_rows": 1024, "flush_interval_s": flush_s},
        "run": {"max_in_flight": in_flight, "progress": "log", "progress_interval_s": 1.0, "stop_grace_s": 0.0, "metrics": False, "replay": False},
    }
    cfg_path = tmp / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(repo), str(REPO), os.environ.get("PYTHONPATH")) if p)}
    log_path = tmp / "run.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "matrix_hpc.cli", "run", str(cfg_path)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=repo
    )
    seen: list[tuple[int, float]] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_commits, args=(out / "part-000" / "commit.json", stop, seen), daemon=True)
    watcher.start()
    try:
        deadline = time.monotonic() + 900
        while True:  # until the window is (nearly) full and commits flow
            counts = [int(m) for m in re.findall(r"in flight (\d+)", log_path.read_text(errors="replace"))]
            if counts and counts[-1] >= 0.9 * in_flight and seen:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the run did not fill its window: see {log_path}")
            time.sleep(0.2)
        time.sleep(settle_s)  # tasks now finish at about --rate a second
        t_term = time.time()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(600)
        t_exit = time.time()
    finally:
        stop.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    watcher.join()
    from matrix_hpc.store import StoreReader

    finished = [float(r["finished_at"] or 0) for r in StoreReader(out).iter_records()]  # in row order
    need = 1 + max((i for i, at in enumerate(finished) if at < t_term), default=-1)
    durable = next((at for rows, at in seen if rows >= need), float("nan"))
    before = max((rows for rows, at in seen if at < t_term), default=0)
    return {
        "in_flight": in_flight, "term_to_durable_s": durable - t_term, "term_to_exit_s": t_exit - t_term, "rc": rc,
        "finished_before_term": need, "committed_at_term": before, "log": str(log_path),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--in-flight", type=int, nargs="+", default=[5000, 50000])
    ap.add_argument("--rate", type=float, default=1000.0, help="tasks finishing per second while the window is full")
    ap.add_argument("--close-s", type=float, default=20.0, help="how long the agents' close() takes")
    ap.add_argument("--flush-s", type=float, default=1.0, help="output.flush_interval_s (the sink's periodic commit)")
    ap.add_argument("--settle-s", type=float, default=20.0, help="how long the full window runs before the TERM")
    ap.add_argument("--repo", type=Path, default=REPO, help="the checkout whose matrix_hpc runs (default: this one)")
    args = ap.parse_args()
    print(f"{'in flight':>9} | {'TERM -> durable (s)':>19} | {'TERM -> exit (s)':>16} | {'finished before TERM':>20} | {'committed at TERM':>17} | rc")
    for k in args.in_flight:
        with tempfile.TemporaryDirectory(prefix="term-bench-") as tmp:
            r = one(k, args.rate, args.close_s, args.flush_s, args.settle_s, args.repo.resolve(), Path(tmp))
        print(
            f"{r['in_flight']:>9} | {r['term_to_durable_s']:>19.2f} | {r['term_to_exit_s']:>16.2f} | {r['finished_before_term']:>20} | {r['committed_at_term']:>17} | {r['rc']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
