"""Time from SIGUSR2 to ``scontrol requeue`` against the size of the store.

Runs the real Slurm entry point (``python -m matrix_hpc.cluster.slurm.bootstrap``,
one node, its own Ray head) on a no-LLM relay job whose output already holds
``--records`` committed records, sends it SIGUSR2 once it commits, and times when
``scontrol requeue`` is called. The instrument: ``scontrol`` is a script on PATH that
notes the time of its call and exits 0 (no Slurm controller is needed or touched),
and ``SLURM_JOB_ID`` is set to a dummy id. Prints one table row per store size.

    python -m benchmarks.requeue_latency --records 0 200000
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

import yaml

REPO = Path(__file__).resolve().parent.parent


def build_store(out: Path, n: int) -> None:
    from matrix_hpc.store import RecordRow, StoreWriter

    w = StoreWriter(out, chunk_rows=1024, fsync=False)
    for lo in range(0, n, 20000):
        batch = []
        for i in range(lo, min(n, lo + 20000)):
            rec = {
                "id": f"t{i}",
                "status": "ok",
                "error": None,
                "row": {"id": f"t{i}"},
                "result": {"hops": 1},
                "turns": [],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "by_role": {}, "by_model": {}},
                "attempt": 1,
                "hops": 1,
                "finished_at": time.time(),
            }
            batch.append(RecordRow.from_record(rec))
        w.append(batch)
        w.commit()
    w.close()


def one(n: int, extra: int, tmp: Path) -> dict[str, float]:
    out = tmp / f"out-{n}"
    build_store(out, n)
    data = tmp / f"data-{n}.jsonl"
    with open(data, "w") as fh:
        for i in range(n + extra):
            fh.write(json.dumps({"id": f"t{i}"}) + "\n")
    cfg = {
        "workflow": {
            "name": "relay",
            "entry": "a",
            "metrics": "benchmarks.requeue_latency:count_metric",
            "roles": {"a": {"agent": "benchmarks.relay.agents:Relay", "concurrency": 64, "params": {"hops": 1, "sleep_s": 0.05}}},
        },
        "dataset": {"path": str(data)},
        "llm": {"engine": "external", "base_urls": ["http://127.0.0.1:9/v1"]},
        "output": {"path": str(out), "chunk_rows": 1024, "flush_interval_s": 0.2},
        "run": {"max_in_flight": 64, "progress": "off", "stop_grace_s": 1.0},
        "cluster": {"kind": "slurm", "slurm": {"job_dir": str(tmp / f"jobs-{n}")}},
    }
    cfg_path = tmp / f"job-{n}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    shim_dir = tmp / "bin"
    shim_dir.mkdir(exist_ok=True)
    calls = tmp / f"scontrol-{n}.log"
    shim = shim_dir / "scontrol"
    # It also notes run.json's status at that moment: "running" means no summary was written yet.
    shim.write_text(
        f'#!/bin/sh\n[ "$1" = requeue ] || exit 0  # the run also reads its job (scontrol show job): not a requeue\n{sys.executable} -c \'import json, sys, time; print(time.time(), json.load(open(sys.argv[1])).get("status"))\' {out / "run.json"} >> {calls}\n'
    )
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{shim_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": f"bench{n}", "SLURM_PROCID": "0", "SLURM_NTASKS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
    log = open(tmp / f"bootstrap-{n}.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "matrix_hpc.cluster.slurm.bootstrap", str(cfg_path)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=REPO,
    )
    try:
        commit = out / "part-000" / "commit.json"
        deadline = time.monotonic() + 300
        while (json.loads(commit.read_text())["rows"] if commit.exists() else 0) < n + 100:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the run did not commit: see {tmp / f'bootstrap-{n}.log'}")
            time.sleep(0.1)
        t_usr2 = time.time()
        proc.send_signal(signal.SIGUSR2)
        rc = proc.wait(300)
        t_exit = time.time()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    lines = calls.read_text().splitlines() if calls.exists() else []
    requeue_at, status = (float(lines[0].split()[0]), lines[0].split()[1]) if lines else (float("nan"), None)
    return {
        "records": n,
        "usr2_to_requeue_s": requeue_at - t_usr2,
        "usr2_to_exit_s": t_exit - t_usr2,
        "rc": rc,
        "requeues": len(lines),
        "status_at_requeue": status,
        "log": (tmp / f"bootstrap-{n}.log").read_text(errors="replace"),
        "out": str(out),
    }


def count_metric(records: object) -> dict[str, int]:
    """A workflow metric that reads every record it is given (what a real one does)."""
    return {"records": sum(1 for _ in records)}  # type: ignore[attr-defined]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, nargs="+", default=[0, 200000])
    ap.add_argument("--extra", type=int, default=3000, help="rows still to do when the run starts")
    args = ap.parse_args()
    print(f"{'records in store':>16} | {'USR2 -> requeue (s)':>19} | {'USR2 -> exit (s)':>16} | rc")
    for n in args.records:
        with tempfile.TemporaryDirectory(prefix="requeue-bench-") as tmp:
            r = one(n, args.extra, Path(tmp))
        print(f"{r['records']:>16} | {r['usr2_to_requeue_s']:>19.2f} | {r['usr2_to_exit_s']:>16.2f} | {r['rc']}", flush=True)


if __name__ == "__main__":
    main()
