"""A run's Slurm jobs: where its job files live, which jobs it had, their state, cancel.

Every job of a run is listed in ``<job dir>/jobs.json`` (by ``submit``, and by
the job itself when it starts from ``sbatch``); ``status`` and ``cancel`` read it.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from ...config import JobConfig
from ...store.layout import JobLayout, RunLayout

__all__ = ["cancel", "job_dir", "job_layout", "job_states", "record_job", "run_jobs"]

_FINAL = ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")


def job_dir(config: JobConfig) -> Path:
    """Logs, submitit files and rendezvous of a run: ``cluster.slurm.job_dir`` or ``<output>/slurm``."""
    return Path(config.cluster.slurm.job_dir or RunLayout(config.output.path).slurm).expanduser().resolve()


def job_layout(config: JobConfig) -> JobLayout:
    """The paths in :func:`job_dir` (store/layout.py)."""
    return JobLayout(job_dir(config))


def record_job(config: JobConfig, job_id: str, via: str) -> None:
    """Add ``job_id`` to the run's job list (idempotent; safe with concurrent writers)."""
    path = job_layout(config).jobs_json
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        jobs = json.loads(path.read_text()) if path.is_file() else []
        if not any(j["job_id"] == job_id for j in jobs):
            jobs.append({"job_id": job_id, "via": via, "recorded_at": time.time()})
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(jobs, indent=1))
            tmp.replace(path)


def run_jobs(output_or_jobdir: str | Path) -> list[dict[str, Any]]:
    """The jobs recorded for an output folder (``<output>/slurm/jobs.json``) or a job dir."""
    root = Path(output_or_jobdir)
    for path in (RunLayout(root).job().jobs_json, JobLayout(root).jobs_json):
        if path.is_file():
            return list(json.loads(path.read_text()))
    return []


def job_states(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """State, elapsed time, nodes and restarts of each job, from ``sacct`` (else ``squeue``)."""
    if not job_ids:
        return {}
    out: dict[str, dict[str, str]] = {}
    if shutil.which("sacct"):
        res = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-j", ",".join(job_ids), "-o", "JobID,State,Elapsed,NodeList,Partition"], capture_output=True, text=True
        )
        for line in res.stdout.splitlines():
            jid, state, elapsed, nodes, part = (line.split("|") + [""] * 5)[:5]
            out[jid] = {"state": state.split()[0] if state else "?", "elapsed": elapsed, "nodes": nodes, "partition": part}
    if shutil.which("scontrol"):
        for jid in job_ids:
            res = subprocess.run(["scontrol", "-o", "show", "job", jid], capture_output=True, text=True)
            fields = dict(kv.split("=", 1) for kv in res.stdout.split() if "=" in kv)
            if fields:
                row = out.setdefault(jid, {})
                row.setdefault("state", fields.get("JobState", "?"))
                row["restarts"] = fields.get("Restarts", "0")
    return out


def cancel(output_or_jobdir: str | Path) -> list[str]:
    """``scancel`` every job of the run that is not finished; returns their ids.

    The driver gets SIGTERM: it stops intake and saves finished work (no requeue).
    """
    ids = [j["job_id"] for j in run_jobs(output_or_jobdir)]
    live = [jid for jid, st in job_states(ids).items() if st.get("state", "?") not in _FINAL]
    if live:
        subprocess.run(["scancel", *live], check=True)
    return live
