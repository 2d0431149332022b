"""matrix-hpc on a real 3-node Slurm cluster (Debian's daemons, started here).

Every way in ends in one Ray cluster over the allocation running the workflow:
``sbatch sbatch/matrix_hpc.sbatch``, ``matrix-hpc submit``, ``matrix_hpc.submit``.
A preemption and an ``scontrol requeue`` interrupt a run; it resumes from the store
each time with every id once, nothing finished redone, and no finished LLM call paid
for twice (``run.replay``).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import BIN, REPO, committed_rows, questions, store_records, write_jsonl
from .slurm_cluster import SlurmCluster, missing_binaries, note_time, wait_until
from .slurm_outsider import probe_running_job

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing_binaries()), reason=f"Slurm not installed (make test installs: {missing_binaries()})"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the test Slurm cluster runs slurmd as root"),
]

DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


@pytest.fixture(autouse=True)
def _empty_cluster(cluster: SlurmCluster) -> Iterator[None]:
    yield
    cluster.reset()


def slurm_config(tmp: Path, n: int, name: str = "job", **overrides: Any) -> tuple[Path, list[dict[str, Any]]]:
    rows = questions(n)
    cfg = yaml.safe_load((REPO / "workflows" / "collab_reasoning" / "config.yaml").read_text())
    cfg["dataset"] = {"path": str(write_jsonl(tmp / f"{name}.jsonl", rows))}
    cfg["output"] = {"path": str(tmp / f"{name}-out"), "flush_interval_s": 0.2}
    cfg["llm"]["max_tokens"] = 16
    cfg["llm"]["embedded"].update(n_parallel=4, threads=1)
    cfg["workflow"]["params"]["max_turns"] = 2
    cfg["run"].update(max_in_flight=8, progress="log", progress_interval_s=2.0, stop_grace_s=5.0)
    cfg["cluster"] = {"kind": "slurm", "slurm": {"partition": "low", "nodes": 2, "cpus_per_node": 2, "time_min": 30}}
    for key, value in overrides.items():
        node = cfg
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, rows


def env_for(cluster: SlurmCluster, **extra: str) -> dict[str, str]:
    return {**os.environ, **cluster.env_overlay, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1", **extra}


def sbatch(cluster: SlurmCluster, cfg: Path, *flags: str, env: dict[str, str] | None = None) -> str:
    out = cfg.parent / f"{cfg.stem}-%j.out"
    res = subprocess.run(
        ["sbatch", "--parsable", "-N2", "--cpus-per-task=2", "-p", "low", f"--output={out}", *flags, str(REPO / "sbatch" / "matrix_hpc.sbatch"), str(cfg)],
        env=env or env_for(cluster), capture_output=True, text=True, cwd=REPO, check=True,
    )  # fmt: skip
    return res.stdout.strip().split(";")[0]


def job_log(cfg: Path, job_id: str) -> str:
    path = cfg.parent / f"{cfg.stem}-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def assert_each_id_once(out: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    records = store_records(out)
    counts = Counter(r["id"] for r in records)
    assert max(counts.values()) == 1, [i for i, c in counts.items() if c > 1]
    assert set(counts) == {r["id"] for r in rows}
    return records


def cluster_info(cfg: Path, job_id: str, restart: int = 0) -> dict[str, Any]:
    return json.loads((cfg.parent / f"{cfg.stem}-out" / "slurm" / f"cluster-{job_id}.{restart}.json").read_text())


def test_sbatch_forms_two_node_ray_cluster_and_completes(cluster: SlurmCluster, tmp_path: Path) -> None:
    cfg, rows = slurm_config(tmp_path, 6)
    t0 = time.time()
    job = sbatch(cluster, cfg)
    info = cluster.wait_job(job, DONE, 300)
    log = job_log(cfg, job)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    nodes = cluster_info(cfg, job)["nodes"]
    assert sorted(n["ip"] for n in nodes) == sorted(cluster.node_addr[n] for n in ("n1", "n2")), nodes  # checked from inside the job
    assert all(n["resources"].get("matrix_cpu_node") and n["resources"].get("matrix_gpu_node") for n in nodes)
    assert_each_id_once(tmp_path / "job-out", rows)
    run = json.loads((tmp_path / "job-out" / "run.json").read_text())
    (entry,) = run["history"]
    assert entry["slurm_job_id"] == job and entry["dispatched"] == 6
    note_time("sbatch -> first task", entry["first_task_at"] - t0)
    status = subprocess.run([str(BIN / "matrix-hpc"), "status", str(tmp_path / "job-out")], env=env_for(cluster), capture_output=True, text=True)
    assert f"slurm:     job {job} (sbatch): COMPLETED" in status.stdout, status.stdout + status.stderr


def test_submit_cli_and_python_api(cluster: SlurmCluster, tmp_path: Path) -> None:
    cfg, rows = slurm_config(tmp_path, 4, "cli")
    res = subprocess.run([str(BIN / "matrix-hpc"), "submit", str(cfg), "--wait"], env=env_for(cluster), capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "submitted Slurm job" in res.stdout and "exit status per node: [0, 0]" in res.stdout
    assert_each_id_once(tmp_path / "cli-out", rows)

    cfg, rows = slurm_config(tmp_path, 4, "api")
    import matrix_hpc

    with cluster.activate():
        job = matrix_hpc.submit(str(cfg))
        assert job.results() == [0, 0]  # type: ignore[attr-defined]
    assert_each_id_once(tmp_path / "api-out", rows)
    assert len(cluster_info(cfg, job.job_id)["nodes"]) == 2  # type: ignore[attr-defined]


def _seconds(run_time: str) -> int:
    """Slurm's ``RunTime`` (``[D-]HH:MM:SS``) in seconds."""
    days, _, hms = run_time.rpartition("-")
    h, m, sec = (int(x) for x in hms.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + sec


def test_preempted_and_requeued_runs_resume_without_redoing_work(cluster: SlurmCluster, tmp_path: Path) -> None:
    """Long dialogues (8 turns, ~0.5 s a call, against a counting server) are interrupted by a
    preemption, by ``scontrol requeue`` and by the job's time limit (brought near with
    ``scontrol update``: the sbatch script's ``--signal=USR2@120`` comes); run.json and
    ``status`` tell the three apart (``ended_by``). Each life resumes from the store: every id once,
    no stored id sent again, and with ``run.replay`` each interruption redoes at most the LLM
    calls in flight (<= max_in_flight = 8). Redone calls = requests the server saw - LLM turns
    in the final records; without replay every call of every dialogue cut short is paid for
    again (48 redone of 188 requests for two preemptions when last measured, against 11 with replay)."""
    from .counting_llm import CountingLLM

    server = CountingLLM(delay_s=(0.3, 0.7), host=cluster.net.host_addr).start()
    try:
        # A 1 s grace (not 5 s): dialogues in flight at the signal are cut short, not finished.
        overrides = {"llm.engine": "external", "llm.base_urls": [server.url], "workflow.params.max_turns": 8, "run.stop_grace_s": 1.0}
        cfg, rows = slurm_config(tmp_path, 32, "pre", **overrides)
        out = tmp_path / "pre-out"
        job = sbatch(cluster, cfg)
        log = lambda: job_log(cfg, job)  # noqa: E731
        interruptions = ["preempt", "scontrol requeue", "time limit"]
        for i, how in enumerate(interruptions):
            if how == "time limit":  # slower dialogues (~36 s each): the run is still going when the warning comes
                server.delay_s = (4.0, 5.0)
            base = committed_rows(out)
            wait_until(lambda: committed_rows(out) >= base + 2, 300, f"progress before interruption {i}", log)
            t_int = time.time()
            if how == "preempt":  # a job on the high partition needs every node
                subprocess.run(
                    ["sbatch", "-p", "high", "-N3", "--exclusive", "--wrap", "sleep 2", "-o", "/dev/null"],
                    env=env_for(cluster),
                    check=True,
                    capture_output=True,
                )
            elif how == "scontrol requeue":
                subprocess.run(["scontrol", "requeue", job], env=env_for(cluster), check=True)
            else:  # the time limit 60-120 s away: slurmctld's next check (every ~30 s) sends USR2
                requeued = log().count("requeued job")
                limit_min = -(-(_seconds(cluster.job(job)["RunTime"]) + 60) // 60)
                cluster.run(["scontrol", "update", f"JobId={job}", f"TimeLimit={limit_min}"])
                # Rank 0 reads the job's record as USR2 comes, then requeues: only then is the limit put back.
                wait_until(lambda: log().count("requeued job") > requeued, 180, "USR2 before the time limit, then the requeue", log)
                cluster.run(["scontrol", "update", f"JobId={job}", "TimeLimit=30"])  # the next life gets the whole limit
                server.delay_s = (0.3, 0.7)
            wait_until(lambda: cluster.job(job).get("Restarts") == str(i + 1), 120, f"requeue {i}", log)
            hist = lambda: json.loads((out / "run.json").read_text()).get("history", [])  # noqa: E731
            wait_until(lambda: len(hist()) == i + 2 and hist()[-1].get("slurm_restart") == i + 1, 300, f"life {i + 1} started", log)
            note_time(f"{how}: interruption -> next life started", time.time() - t_int)
        info = cluster.wait_job(job, DONE, 900)
        assert info["JobState"] == "COMPLETED", log()[-4000:]
        records = assert_each_id_once(out, rows)
    finally:
        server.stop()

    run_json = json.loads((out / "run.json").read_text())
    history = run_json["history"]
    assert [h.get("slurm_restart") for h in history] == [0, 1, 2, 3], history
    assert history[-1]["status"] == "finished"
    assert "SIGUSR2: stopping intake" in log() and "SIGTERM: stopping intake" in log()
    # Why each life stopped, read from the job's record as the first signal came (stopcause.py).
    # A USR2 life writes it before it requeues; a TERM life may be KILLed (KillWait 5 s) first.
    assert (history[0].get("stop_signal"), history[0].get("ended_by")) == ("SIGUSR2", "preempted"), (history[0], log()[-3000:])
    assert history[1].get("ended_by", "requeued") == "requeued" and history[1].get("stop_signal", "SIGTERM") == "SIGTERM", history[1]
    assert (history[2].get("stop_signal"), history[2].get("ended_by")) == ("SIGUSR2", "time_limit"), (history[2], log()[-3000:])
    assert "ended_by" not in history[3]
    assert {k: v for k, v in run_json["interruptions"].items() if k != "requeued"} == {"preempted": 1, "time_limit": 1}, run_json
    assert "requeued job" in log() and "after SIGUSR2 (time limit)" in log()
    st = subprocess.run([str(BIN / "matrix-hpc"), "status", str(out)], env=env_for(cluster), capture_output=True, text=True).stdout
    lives = next(line for line in st.splitlines() if line.startswith("lives:"))
    assert lives.startswith("lives:     4 (stopped by: 1 preempted, ") and lives.endswith("1 time limit)"), st
    for prev, nxt in zip(history, history[1:]):
        # A life killed before it could save has no end fields; its commits still count.
        assert prev.get("status", "interrupted") == "interrupted", prev
        assert nxt["skipped"] >= prev["skipped"] + prev.get("committed", 0), (prev, nxt)
        if "dispatched" in nxt:  # the source never re-sends a stored id
            assert nxt["dispatched"] <= len(rows) - nxt["skipped"]
        if prev.get("finished_at") and nxt.get("first_task_at"):  # a life SIGKILLed before saving has no first_task_at
            note_time("resume: previous life saved -> first task", nxt["first_task_at"] - prev["finished_at"])
    # Redone tasks and redone LLM calls are each bounded by what was in flight at each interruption.
    redone_tasks = sum(h["dispatched"] for h in history if "dispatched" in h) - len(rows)
    assert redone_tasks <= 8 * len(interruptions), history
    turns = [t for r in records for t in r["turns"] if t["endpoint"]]
    replayed = sum(t["replayed"] for t in turns)
    redone = server.received - len(turns)
    print(f"\nslurm preemption + requeue: {server.received} LLM requests for {len(turns)} turns kept; redone {redone}, replayed {replayed}")
    assert redone <= 8 * len(interruptions), f"{redone} calls redone; at most 8 are in flight per interruption"
    assert replayed > 0, "no dialogue cut short by an interruption was resumed from the journal"
    assert not (out / "journal").exists()


# The mpich wheel defaults to UCX, whose addresses for these test nodes (one host,
# separate /dev/shm) are long enough to break Slurm 22.05's pmi2 message framing
# ("mpi/pmi2: invalid client request") about one start in three; OFI over TCP has
# short addresses. Real nodes need neither setting.
MPI_ENV = {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp"}


def test_mpi_rendezvous_over_srun_pmi2(cluster: SlurmCluster, tmp_path: Path) -> None:
    cfg, rows = slurm_config(tmp_path, 3, "mpi", **{"cluster.slurm.rendezvous": "mpi"})
    job = sbatch(cluster, cfg, env=env_for(cluster, MATRIX_HPC_SRUN_ARGS="--mpi=pmi2", **MPI_ENV))
    info = cluster.wait_job(job, DONE, 300)
    assert info["JobState"] == "COMPLETED", job_log(cfg, job)[-4000:]
    formed = cluster_info(cfg, job)
    assert formed["via"] == "mpi" and len(formed["nodes"]) == 2
    assert "rendezvous by mpi" in job_log(cfg, job)
    assert not (tmp_path / "mpi-out" / "slurm" / "rendezvous" / f"{job}.0" / "head.json").exists()
    assert_each_id_once(tmp_path / "mpi-out", rows)


def test_mpi_rendezvous_fails_with_a_message_when_rank0_is_gone(cluster: SlurmCluster, tmp_path: Path) -> None:
    # Rank 0 dies before broadcasting (as when MPI init fails on its node): the
    # other rank must give up after the join timeout, not spin forever.
    script = (
        "import os, sys; from matrix_hpc.cluster.slurm.rendezvous import Rendezvous, mpi_world\n"
        "c = mpi_world(); r = c.Get_rank()\n"
        "if r == 0: os._exit(3)\n"
        f"Rendezvous({str(tmp_path)!r}, r, c.Get_size(), 'mpi').exchange(None, 3)\n"
    )
    t0 = time.monotonic()
    res = subprocess.run(
        ["srun", "-p", "low", "-N2", "--ntasks-per-node=1", "--kill-on-bad-exit=0", "--mpi=pmi2", str(BIN / "python"), "-c", script],
        env=env_for(cluster, **MPI_ENV), capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert res.returncode != 0
    assert "rank 1: no head address from rank 0 by MPI broadcast after 3s" in res.stderr, res.stderr[-3000:]
    assert time.monotonic() - t0 < 60


def test_heterogeneous_job_puts_services_on_gpu_nodes_and_agents_on_cpu_nodes(cluster: SlurmCluster, tmp_path: Path) -> None:
    # The header edit a user makes for these nodes (4 CPUs, no GPUs): one node per group.
    text = (REPO / "sbatch" / "matrix_hpc_het.sbatch").read_text()
    script = tmp_path / "het.sbatch"
    script.write_text(text.replace("--cpus-per-task=16", "--cpus-per-task=2").replace("#SBATCH --nodes=2", "#SBATCH --nodes=1"))
    cfg, rows = slurm_config(tmp_path, 6, "het")
    res = subprocess.run(
        ["sbatch", "--parsable", f"--output={tmp_path / 'het-%j.out'}", str(script), str(cfg)],
        env=env_for(cluster), capture_output=True, text=True, cwd=REPO, check=True,
    )  # fmt: skip
    job = res.stdout.strip().split(";")[0]
    info = cluster.wait_job(job, DONE, 300)
    assert info["JobState"] == "COMPLETED", job_log(cfg, job)[-4000:]
    nodes = {n["hostname"]: n["resources"] for n in cluster_info(cfg, job)["nodes"]}
    gpu = [h for h, r in nodes.items() if "matrix_gpu_node" in r]
    cpu = [h for h, r in nodes.items() if "matrix_cpu_node" in r]
    assert len(gpu) == len(cpu) == 1 and gpu != cpu, nodes  # each group labelled only as itself
    run = json.loads((tmp_path / "het-out" / "run.json").read_text())
    agent_hosts = {h for name, h in run["actor_hosts"].items() if "__sink__" not in name}
    assert agent_hosts == set(cpu), run["actor_hosts"]
    ip = cluster.node_addr[gpu[0]]
    assert all(e["url"].startswith(f"http://{ip}:") for e in run["llm"]), run["llm"]  # the replica ran on the GPU node
    assert_each_id_once(tmp_path / "het-out", rows)


def test_two_runs_on_the_same_nodes_do_not_collide(cluster: SlurmCluster, tmp_path: Path) -> None:
    (cfg_a, rows_a), (cfg_b, rows_b) = slurm_config(tmp_path, 4, "a"), slurm_config(tmp_path, 4, "b")
    jobs = [sbatch(cluster, cfg, "-w", "n1,n2") for cfg in (cfg_a, cfg_b)]
    wait_until(lambda: all(cluster.state(j) == "RUNNING" for j in jobs), 120, "both running")
    # n3 is another user's host on the same network: run a's token, key and ports admit it nowhere.
    token, key = probe_running_job(cluster, cfg_a, tmp_path / "a-out", tmp_path / "a-out" / "slurm", ("n1", "n2"), "n3")
    for cfg, job in zip((cfg_a, cfg_b), jobs):
        info = cluster.wait_job(job, DONE, 400)
        assert info["JobState"] == "COMPLETED", job_log(cfg, job)[-4000:]
    leaked = [str(f) for f in tmp_path.rglob("*") if f.is_file() and (token.encode() in f.read_bytes() or key.encode() in f.read_bytes())]
    assert not leaked, leaked  # the job logs, run.json, the store; the token and key files are removed at the end
    a, b = cluster_info(cfg_a, jobs[0]), cluster_info(cfg_b, jobs[1])
    assert a["address"] != b["address"]  # each run its own Ray head port on n1
    assert {n["ip"] for n in a["nodes"]} == {n["ip"] for n in b["nodes"]} == {cluster.node_addr["n1"], cluster.node_addr["n2"]}
    assert_each_id_once(tmp_path / "a-out", rows_a)
    assert_each_id_once(tmp_path / "b-out", rows_b)
    # Ray's per-job temp dirs are node-local and removed at the end of the life
    for node in ("n1", "n2"):
        left = cluster.node_exec(node, ["sh", "-c", "ls -d /tmp/mhpc-* 2>/dev/null || true"]).stdout.split()
        assert not [d for d in left if any(d.startswith(f"/tmp/mhpc-{j}.") for j in jobs)], (node, left)
