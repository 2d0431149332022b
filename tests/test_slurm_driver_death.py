"""The driver on rank 0 dies, or ends while a worker cannot see its ``done`` file.

On the namespaced test cluster (``tests/slurm_cluster.py``): the driver process alone
is SIGKILLed on the head node (as the OOM killer or a segfault would end it; the Ray
head and the workers live on) and the job is requeued within 60 s, the next life
resumes, and once ``cluster.slurm.max_requeues`` is used up a killed driver ends the
job as failed with one line. A worker whose view of the rendezvous folder lags (the
``done`` file appears there only well after rank 0 has ended, as NFS's lookup cache
does) still ends with the run and never requeues a finished job.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import committed_rows
from .slurm_cluster import SlurmCluster, missing_binaries, note_time, wait_until
from .test_slurm_run import DONE, assert_each_id_once, job_log, sbatch, slurm_config

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing_binaries()), reason=f"Slurm not installed (make test installs: {missing_binaries()})"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the test Slurm cluster runs slurmd as root"),
]


@pytest.fixture(autouse=True)
def _empty_cluster(cluster: SlurmCluster) -> Iterator[None]:
    yield
    cluster.reset()


def _run_info(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / "run.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _driver_started(out: Path, restart: int, status: tuple[str, ...] = ("starting", "running")) -> int:
    """The driver's pid (in its node's PID namespace) once life ``restart`` has written run.json, else 0."""
    info = _run_info(out)
    history = info.get("history") or [{}]
    if info.get("status") in status and history[-1].get("slurm_restart") == restart:
        return int(info["driver_pid"])
    return 0


def _kill_driver(cluster: SlurmCluster, node: str, pid: int) -> float:
    """SIGKILL the driver process alone (checked to be rank 0's bootstrap, not srun); returns the kill's time."""
    cmdline = cluster.node_exec(node, ["cat", f"/proc/{pid}/cmdline"]).stdout.split("\0")
    assert "matrix_hpc.cluster.slurm.bootstrap" in cmdline and "python" in Path(cmdline[0]).name, cmdline
    cluster.node_exec(node, ["kill", "-KILL", str(pid)])
    t = time.time()
    wait_until(lambda: cluster.node_exec(node, ["test", "-e", f"/proc/{pid}"], check=False).returncode != 0, 30, f"driver pid {pid} gone")
    return t


@pytest.mark.timeout(900)
def test_killed_driver_requeues_then_fails_cleanly_once_requeues_are_used_up(cluster: SlurmCluster, tmp_path: Path) -> None:
    """Life 0: the driver is SIGKILLed mid-run; a worker learns it at once (the driver's lifeline
    connection breaks) and requeues the job within 60 s; life 1 starts on what life 0 committed.
    Life 1's driver is SIGKILLed as soon as it has started: max_requeues (1) is used up, so the job
    ends FAILED with one line."""
    # head_lost_s above the 60 s bound: the requeue must not wait for the head's GCS to go away
    # (here Slurm's cgroup takes the Ray head down with the driver's task; where process tracking
    # lets it escape, as the head runs in its own session, the GCS never goes away at all).
    cfg, rows = slurm_config(tmp_path, 120, "dd", **{"cluster.slurm.max_requeues": 1, "cluster.slurm.head_lost_s": 120})
    out = tmp_path / "dd-out"
    job = sbatch(cluster, cfg, "-w", "n1,n2")
    log = lambda: job_log(cfg, job)  # noqa: E731
    pid = wait_until(lambda: _driver_started(out, 0, ("running",)), 300, "life 0's driver running", log)
    wait_until(lambda: committed_rows(out) >= 1, 300, "first commits", log)
    head = cluster.job(job)["BatchHost"]
    t_kill = _kill_driver(cluster, head, pid)
    wait_until(lambda: cluster.job(job).get("Restarts") == "1", 120, "requeue after the driver died", log)
    requeued_s = time.time() - t_kill
    note_time("driver killed -> requeued", requeued_s)
    assert requeued_s <= 60, f"requeued {requeued_s:.1f}s after the driver died (the bound is 60 s)\n{log()[-3000:]}"
    assert "the driver on rank 0" in log(), log()[-3000:]

    pid = wait_until(lambda: _driver_started(out, 1), 300, "life 1's driver started", log)
    life1 = _run_info(out)["history"][-1]
    note_time("driver killed -> next life started", life1["started_at"] - t_kill)
    assert life1["skipped"] >= 1, life1  # it resumes from what life 0 had committed
    head = cluster.job(job)["BatchHost"]
    _kill_driver(cluster, head, pid)
    info = cluster.wait_job(job, DONE, 180)
    text = log()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "1", (info, text[-3000:])
    assert "not requeued: restart 1 reached cluster.slurm.max_requeues" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]


@pytest.mark.timeout(600)
def test_worker_that_cannot_see_done_yet_ends_with_the_run_and_never_requeues(cluster: SlurmCluster, tmp_path: Path) -> None:
    """Once the cluster has formed, n2's view of the rendezvous folder is frozen: a bind mount on
    n2 alone shows a copy of it, where rank 0's ``done`` appears only 20 s after rank 0 wrote it
    (NFS's lookup cache hides a new file for up to 60 s; the worker really cannot see it). Rank 0
    ends the run and stops its head meanwhile; with head_lost_s 5 the worker would requeue the
    finished job. It does not: rank 0 tells it the run is over on its lifeline and waits for its
    acknowledgement before the head goes away. The job completes in its first life."""
    cfg, rows = slurm_config(tmp_path, 6, "nd", **{"cluster.slurm.head_lost_s": 5})
    out = tmp_path / "nd-out"
    job = sbatch(cluster, cfg, "-w", "n1,n2")
    log = lambda: job_log(cfg, job)  # noqa: E731
    key = f"{job}.0"
    wait_until(lambda: (out / "slurm" / f"cluster-{key}.json").exists(), 300, "the Ray cluster formed", log)
    real = out / "slurm" / "rendezvous" / key
    shadow = tmp_path / "n2-view"
    shutil.copytree(real, shadow)
    assert not (shadow / "done").exists()
    cluster.node_exec("n2", ["mount", "--bind", str(shadow), str(real)])
    try:
        wait_until(lambda: (real / "done").exists() or cluster.state(job) in DONE, 300, "rank 0 ending the run", log)
        t_done = time.time()
        hidden = cluster.node_exec("n2", ["test", "-e", str(real / "done")], check=False).returncode != 0
        assert hidden, "n2 sees the done file: the test's hiding does not work"
        # the lookup cache expires: the file appears on n2 late, unless the job has ended by then
        wait_until(lambda: cluster.state(job) in DONE or time.time() - t_done > 20, 60, "the job ending or 20 s")
        if (real / "done").exists():
            shutil.copy(real / "done", shadow / "done")
        info = cluster.wait_job(job, DONE, 300)
    finally:
        cluster.node_exec("n2", ["umount", str(real)], check=False)
    text = log()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", (info, text[-3000:])
    assert "requeued job" not in text and "is unreachable" not in text, text[-3000:]
    assert_each_id_once(out, rows)
    (life,) = json.loads((out / "run.json").read_text())["history"]
    assert life["status"] == "finished", life
