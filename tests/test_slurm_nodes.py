"""matrix-hpc when the nodes are separate hosts and one of them dies.

On the namespaced test cluster (``tests/slurm_cluster.py``: each node its own
network, hostname, /tmp, /dev/shm and process table): a worker node killed
mid-run (every process of it at once) leaves a run that completes with every id
once; a killed head node gets the job requeued and the next life completes it; an
``output.path`` that only one node can see stops the run at once, naming the node.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import committed_rows
from .slurm_cluster import SlurmCluster, missing_binaries, note_time, wait_until
from .test_slurm_run import DONE, assert_each_id_once, cluster_info, job_log, sbatch, slurm_config

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing_binaries()), reason=f"Slurm not installed (make test installs: {missing_binaries()})"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the test Slurm cluster runs slurmd as root"),
]


@pytest.fixture(autouse=True)
def _empty_cluster(cluster: SlurmCluster) -> Iterator[None]:
    yield
    cluster.reset()  # a test that killed a node gets it booted again


def _commits(out: Path, samples: list[tuple[float, int]]) -> int:
    rows = committed_rows(out)
    samples.append((time.time(), rows))
    return rows


def test_output_path_seen_by_one_node_stops_at_once_naming_the_node(cluster: SlurmCluster, tmp_path: Path) -> None:
    # /tmp is each node's own: the head and the worker each get a store nobody else sees.
    local = f"/tmp/mhpc-node-local-{os.getpid()}/out"
    cfg, _ = slurm_config(tmp_path, 4, "local", **{"output.path": local, "cluster.slurm.fs_probe_timeout_s": 5})
    t0 = time.time()
    job = sbatch(cluster, cfg, "-w", "n1,n2")
    info = cluster.wait_job(job, DONE, 120)
    note_time("node-local output.path: sbatch -> job ended", time.time() - t0)
    log = job_log(cfg, job)
    assert info["JobState"] == "FAILED", log[-3000:]
    lines = [line for line in log.splitlines() if line.startswith("matrix-hpc: output.path")]
    assert any(f"output.path {local} is not visible from node n2:" in line for line in lines), log[-3000:]
    assert any(f"output.path {local} is not visible from node(s) n2:" in line for line in lines), log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert time.time() - t0 < 90


@pytest.mark.timeout(1200)  # a loaded machine: two lives of Ray start-up and a dead-node detection
def test_worker_node_death_mid_run_completes_every_id_once(cluster: SlurmCluster, tmp_path: Path) -> None:
    """n2 (a worker: agent actors, an LLM replica) crashes mid-run: all its processes die at once
    (slurmd, the job step, Ray) and slurmctld marks it down. The job goes on on n1 (--no-kill):
    Ray re-creates the actors there, the driver re-sends their tasks, the registry replaces the
    replica; every id ends in the store once."""
    cfg, rows = slurm_config(
        tmp_path, 48, "wd", **{
            "workflow.roles.teacher.instances": 2, "workflow.roles.student.instances": 2, "llm.replicas": 2,
            "llm.health_interval_s": 1.0, "llm.timeout_s": 30,  # a call to the dead node hangs until then
        },
    )  # fmt: skip
    out = tmp_path / "wd-out"
    job = sbatch(cluster, cfg, "-w", "n1,n2")
    log = lambda: job_log(cfg, job)  # noqa: E731
    samples: list[tuple[float, int]] = []
    wait_until(lambda: _commits(out, samples) >= 4, 300, "first commits", log)
    run = json.loads((out / "run.json").read_text())
    n2_ip = cluster.node_addr["n2"]
    on_n2 = [name for name, host in run["actor_hosts"].items() if host == "n2"]
    assert on_n2 and all("__sink__" not in name for name in on_n2), run["actor_hosts"]  # agents spread; the sink with the driver
    assert any(e["url"].startswith(f"http://{n2_ip}:") for e in run["llm"]), run["llm"]  # so is the LLM
    before = committed_rows(out)
    t_kill = cluster.kill_node("n2")
    assert cluster.node_pids("n2") == []
    flowing = wait_until(lambda: _commits(out, samples) > before + 2 and samples[-1][0], 300, "commits after the kill", log)
    info = cluster.wait_job(job, DONE, 600)
    assert info["JobState"] == "COMPLETED", log()[-4000:]
    assert info["Restarts"] == "0", info  # the run went on in the same life

    assert_each_id_once(out, rows)
    run = json.loads((out / "run.json").read_text())
    (entry,) = run["history"]
    assert entry["status"] == "finished", entry
    assert all(e["url"].startswith(f"http://{cluster.node_addr['n1']}:") for e in run["llm"] if e["state"] == "up"), run["llm"]
    note_time("worker node killed -> commits again", flowing - t_kill)
    note_time("worker node killed: tasks re-sent", entry["resent"])
    note_time("worker node killed: run total", entry["finished_at"] - entry["started_at"])
    print(f"\nworker node death: commits again {flowing - t_kill:.1f}s after the kill; {entry['resent']} task(s) re-sent")


@pytest.mark.timeout(1200)
def test_head_node_death_requeues_and_next_life_completes(cluster: SlurmCluster, tmp_path: Path) -> None:
    """The first node (Ray head, driver, sink) crashes: Slurm requeues the job (--requeue, node
    failure) onto the nodes left, and the next life resumes from the store: every id once."""
    # The worker gives up on an unreachable head after head_lost_s (30 s by default) and requeues.
    cfg, rows = slurm_config(tmp_path, 24, "hd", **{"cluster.slurm.head_lost_s": 10})
    out = tmp_path / "hd-out"
    job = sbatch(cluster, cfg)
    log = lambda: job_log(cfg, job)  # noqa: E731
    wait_until(lambda: committed_rows(out) >= 4, 300, "first commits", log)
    head = cluster.job(job)["BatchHost"]
    assert cluster_info(cfg, job)["nodes"], "cluster formed"
    t_kill = cluster.kill_node(head)
    wait_until(lambda: cluster.job(job).get("Restarts") == "1", 120, "requeue after the head node died", log)
    wait_until(lambda: cluster.state(job) == "RUNNING", 180, "running again", log)
    note_time("head node killed -> running again", time.time() - t_kill)
    info = cluster.wait_job(job, DONE, 600)
    assert info["JobState"] == "COMPLETED", log()[-4000:]
    assert head not in info["NodeList"], info  # the second life ran on the nodes left
    assert_each_id_once(out, rows)
    history = json.loads((out / "run.json").read_text())["history"]
    assert [h.get("slurm_restart") for h in history] == [0, 1], history
    assert history[-1]["status"] == "finished" and history[-1]["skipped"] >= 4, history
    note_time("head node killed: stored before the kill (skipped by life 1)", history[-1]["skipped"])
