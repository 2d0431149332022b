"""Peak memory of the driver and the sink over a long run of tiny tasks.

Runs ``matrix-hpc run`` on the no-LLM relay workflow (``benchmarks/relay``, one hop
per task) over ``--tasks`` rows and samples the resident set size (RSS) of the
driver process and of the sink actor once a second. Prints RSS at each tenth of the
run and the peaks: a structure that grows with every task shows as a rising line.

    python -m benchmarks.long_run_memory --tasks 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent


def rss_mb(pid: int | None) -> float:
    try:
        return psutil.Process(pid).memory_info().rss / 2**20 if pid else float("nan")
    except psutil.NoSuchProcess:
        return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=1_000_000)
    ap.add_argument("--max-in-flight", type=int, default=4000)
    ap.add_argument("--keep", help="write the output here (default: a temp dir, removed)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="memrun-") as tmp_s:
        tmp = Path(tmp_s)
        data = tmp / "data.jsonl"
        with open(data, "w") as fh:
            for i in range(args.tasks):
                fh.write(json.dumps({"id": f"t{i}"}) + "\n")
        out = Path(args.keep) if args.keep else tmp / "out"
        cfg = {
            "workflow": {"name": "relay", "entry": "a", "roles": {"a": {"agent": "benchmarks.relay.agents:Relay", "concurrency": 2000, "params": {"hops": 1}}}},
            "dataset": {"path": str(data)},
            "llm": {"engine": "external", "base_urls": ["http://127.0.0.1:9/v1"]},
            "output": {"path": str(out), "chunk_rows": 4096, "flush_interval_s": 1.0, "fsync": False},
            "run": {"max_in_flight": args.max_in_flight, "batch_size": 256, "progress": "off", "stall_timeout_s": 0},
        }
        cfg_path = tmp / "job.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
        log = open(tmp / "run.log", "wb")
        bin_dir = Path(sys.executable).parent
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [str(bin_dir / "matrix-hpc"), "run", str(cfg_path)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO
        )
        sink_pid: int | None = None
        peak = {"driver": 0.0, "sink": 0.0}
        next_mark = 0.1
        print(f"{'committed':>10} | {'elapsed s':>9} | {'driver RSS MB':>13} | {'sink RSS MB':>11}")
        try:
            while proc.poll() is None:
                time.sleep(1.0)
                if sink_pid is None:
                    try:
                        actors = json.loads((out / "run.json").read_text()).get("actors") or {}
                        sink_pid = next((p for n, p in actors.items() if n.endswith("__sink__")), None)
                    except (OSError, ValueError):
                        pass
                d, s = rss_mb(proc.pid), rss_mb(sink_pid)
                peak["driver"], peak["sink"] = max(peak["driver"], d), max(peak["sink"], s if s == s else 0.0)
                try:
                    rows = json.loads((out / "part-000" / "commit.json").read_text())["rows"]
                except (OSError, ValueError, KeyError):
                    rows = 0
                if rows >= next_mark * args.tasks:
                    print(f"{rows:>10} | {time.monotonic() - t0:>9.0f} | {d:>13.0f} | {s:>11.0f}", flush=True)
                    next_mark += 0.1
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        print(f"exit {proc.returncode} after {time.monotonic() - t0:.0f}s; peak RSS: driver {peak['driver']:.0f} MB, sink {peak['sink']:.0f} MB")
        if proc.returncode != 0:
            print((tmp / "run.log").read_text(errors="replace")[-3000:])


if __name__ == "__main__":
    main()
