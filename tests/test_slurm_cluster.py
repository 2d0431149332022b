"""The test Slurm cluster itself: 3 nodes, accounting, preemption, MPI and submitit on it.

One cluster for the module (start ~2-4 s). Timings of each check go to
``<cluster base>/timings.json`` and are printed at teardown (see them with ``-s``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.slurm_cluster import SlurmCluster, missing_binaries, wait_until

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        bool(missing_binaries()),
        reason="Slurm not installed: apt-get install --no-install-recommends " + " ".join(sorted(set(missing_binaries().values()))),
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="the test Slurm cluster runs slurmd as root"),
]

PY = sys.executable
BIN = Path(sys.executable).parent
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    base = tmp_path_factory.mktemp("slurm")
    c = SlurmCluster(base, shared=[tmp_path_factory.getbasetemp()])
    c.start()
    TIMINGS["cluster start"] = c.timings["start"]
    try:
        yield c
    finally:
        c.stop()
        TIMINGS["cluster stop"] = c.timings["stop"]
        (base / "timings.json").write_text(json.dumps(TIMINGS, indent=1))
        print("\nslurm cluster timings (s): " + ", ".join(f"{k}={v:.2f}" for k, v in TIMINGS.items()))


@pytest.fixture(autouse=True)
def _no_jobs_left(cluster: SlurmCluster) -> Iterator[None]:
    """Each test starts on an empty cluster, whatever the previous one left behind."""
    yield
    assert cluster.cancel_all(timeout=30), "jobs still listed 30 s after scancel"
    cluster.wait_idle(timeout=30)


def wait_done(cluster: SlurmCluster, job: str, timeout: float = 60) -> dict[str, str]:
    return cluster.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout)


def test_three_idle_nodes(cluster: SlurmCluster) -> None:
    out = cluster.run(["sinfo", "-h", "-N", "-o", "%N %P %t %c"]).stdout.split("\n")
    rows = {tuple(line.split()) for line in out if line.strip()}
    for n in ("n1", "n2", "n3"):
        assert (n, "low*", "idle", "4") in rows, rows
        assert (n, "high", "idle", "4") in rows, rows


def test_batch_job_on_two_nodes_is_accounted(cluster: SlurmCluster, tmp_path: Path) -> None:
    t0 = time.monotonic()
    job = cluster.sbatch("-N2", "-o", str(tmp_path / "%j.out"), "--wrap", "srun hostname")
    cluster.wait_job(job, {"RUNNING", "COMPLETING", "COMPLETED"}, timeout=30)
    TIMINGS["sbatch -> running"] = time.monotonic() - t0
    info = wait_done(cluster, job)
    TIMINGS["sbatch -N2 srun hostname, total"] = time.monotonic() - t0
    assert info["JobState"] == "COMPLETED", info
    hosts = (tmp_path / f"{job}.out").read_text().split()
    assert len(hosts) == 2 and len(set(hosts)) == 2 and set(hosts) <= {"n1", "n2", "n3"}, hosts
    # slurmdbd gets the record asynchronously: poll
    wait_until(lambda: cluster.sacct_state(job) == "COMPLETED", 20, f"sacct COMPLETED for {job}")
    TIMINGS["sbatch -> sacct COMPLETED"] = time.monotonic() - t0


TCP_PROBE = r"""
import os, socket, subprocess, sys, time
host = socket.gethostname()
addr = subprocess.run(["getent", "hosts", host], capture_output=True, text=True).stdout.split()[0]
print(f"IDENT {host} {os.environ['SLURMD_NODENAME']} {addr}", flush=True)
if sys.argv[1] == "server":
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, int(sys.argv[2])))
    s.listen(1)
    s.settimeout(30)
    c, peer = s.accept()
    c.sendall(f"hello from {host}".encode())
    c.close()
else:
    for _ in range(300):
        try:
            c = socket.create_connection((sys.argv[3], int(sys.argv[2])), timeout=2)
            break
        except OSError:
            time.sleep(0.1)
    print(f"CLIENT {host} got: {c.recv(100).decode()}", flush=True)
"""


def test_steps_see_their_node_and_reach_each_other(cluster: SlurmCluster, tmp_path: Path) -> None:
    """A server in n1's step on n1's bridge address is reachable from n2's step (the Ray head/worker pattern)."""
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    probe = tmp_path / "probe.py"
    probe.write_text(TCP_PROBE)
    script = f"srun -N1 -n1 -w n1 {PY} {probe} server {port} & srun -N1 -n1 -w n2 {PY} {probe} client {port} {cluster.node_addr['n1']}; wait"
    t0 = time.monotonic()
    job = cluster.sbatch("-N2", "-w", "n1,n2", "-o", str(tmp_path / "%j.out"), "--wrap", script)
    info = wait_done(cluster, job)
    TIMINGS["two-step TCP job, total"] = time.monotonic() - t0
    out = (tmp_path / f"{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", out
    idents = {tuple(line.split()[1:]) for line in out.splitlines() if line.startswith("IDENT")}
    assert idents == {("n1", "n1", cluster.node_addr["n1"]), ("n2", "n2", cluster.node_addr["n2"])}, out
    assert "CLIENT n2 got: hello from n1" in out, out


HOST_PROBE = r"""
import json, os, socket, subprocess, sys, time
host = socket.gethostname()
marker = f"/tmp/only-on-{host}"
open(marker, "w").write(host)
addrs = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
print("HOST " + json.dumps({"host": host, "ips": [l.split()[3] for l in addrs.splitlines()],
      "tmp": sorted(os.listdir("/tmp")), "shm": sorted(os.listdir("/dev/shm")), "pids": len([p for p in os.listdir("/proc") if p.isdigit()])}), flush=True)
"""


def test_nodes_are_separate_hosts(cluster: SlurmCluster, tmp_path: Path) -> None:
    """Two nodes differ as real hosts do: address (on the suite's bridge, not 127.x), hostname,
    /tmp, /dev/shm and process table; pytest's base temp dir and the checkout are shared."""
    probe = tmp_path / "host_probe.py"
    probe.write_text(HOST_PROBE)
    job = cluster.sbatch("-N2", "-w", "n1,n2", "-o", str(tmp_path / "%j.out"), "--wrap", f"srun {PY} {probe}")
    info = wait_done(cluster, job)
    out = (tmp_path / f"{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", out
    seen = {h["host"]: h for h in (json.loads(line[5:]) for line in out.splitlines() if line.startswith("HOST "))}
    assert set(seen) == {"n1", "n2"}, out
    for n, h in seen.items():
        assert [ip.split("/")[0] for ip in h["ips"]] == ["127.0.0.1", cluster.node_addr[n]], h  # lo and the bridge only
        assert f"only-on-{n}" in h["tmp"] and f"only-on-{'n2' if n == 'n1' else 'n1'}" not in h["tmp"], h
        assert h["pids"] < 30, h  # its own process table, not the host's
    assert not Path("/tmp/only-on-n1").exists()  # the host's /tmp is not a node's
    ls = cluster.node_exec("n1", ["ls", "/tmp"]).stdout.split()
    assert "only-on-n1" in ls and "only-on-n2" not in ls, ls
    assert cluster.node_addr["n1"] != cluster.node_addr["n2"] and not cluster.node_addr["n1"].startswith("127.")


CHECKOUT_PROBE = r"""
import sys
from pathlib import Path
from tests.slurm_cluster import SlurmCluster
base, checkout = Path(sys.argv[1]), sys.argv[2]
with SlurmCluster(base, n_nodes=1, shared=[]) as c:
    print("SHARED", c.shared)
    print("SEEN", c.node_exec("n1", ["ls", f"{checkout}/tests/slurm_cluster.py"], check=False).stdout.strip())
"""


def test_a_checkout_under_tmp_is_seen_by_the_nodes(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A clone under /tmp (``git clone`` into ``/tmp/x``, then ``make test``) is shared with the
    nodes, whose /tmp is otherwise a fresh tmpfs (22 Slurm tests errored at setup with
    ``exec: <checkout>/.venv/bin/python: not found``): a copy of the suite's cluster code under
    /tmp, outside pytest's temp dir, starts a node that sees the copy."""
    import shutil
    import subprocess
    import tempfile

    checkout = Path(tempfile.mkdtemp(prefix="mhpc-clone-", dir="/tmp"))
    try:
        shutil.copytree(Path(__file__).parent, checkout / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        (checkout / "probe.py").write_text(CHECKOUT_PROBE)
        base = tmp_path_factory.mktemp("slurm-clone")
        r = subprocess.run([PY, "probe.py", str(base), str(checkout)], cwd=checkout, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"SEEN {checkout}/tests/slurm_cluster.py" in r.stdout, r.stdout + r.stderr
    finally:
        shutil.rmtree(checkout, ignore_errors=True)


def test_node_shared_dirs_keeps_the_outermost_dirs_under_tmp() -> None:
    from tests.slurm_cluster import REPO, node_shared_dirs

    dirs = node_shared_dirs(["/tmp/a/b", "/tmp/a", "/tmp/ab", "/var/x"])
    assert "/tmp/a" in dirs and "/tmp/ab" in dirs and "/tmp/a/b" not in dirs and "/var/x" not in dirs, dirs
    assert (str(REPO) in dirs) == str(REPO).startswith("/tmp/"), dirs


def test_a_dead_sessions_namespaces_and_processes_are_cleaned_up() -> None:
    """What a SIGKILLed session left (a namespace named after its dead pid, a process inside,
    its bridge) goes at the next start; a live session's namespaces stay."""
    import subprocess

    from tests.netns import TestNet, clean_stale

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    live = TestNet(owner_pid=os.getppid()).create()  # a live session's (its owner, our parent, runs)
    live.add_host("t2", 2)
    net = TestNet(owner_pid=dead.pid).create()  # creating cleans stale ones too: make it last
    net.add_host("t1", 2)
    left = subprocess.Popen(["nsenter", f"--net={net.ns_path('t1')}", "sleep", "300"], start_new_session=True)
    own_net = os.readlink("/proc/self/ns/net")
    wait_until(lambda: os.readlink(f"/proc/{left.pid}/ns/net") != own_net, 10, "the process inside the namespace")
    try:
        removed = clean_stale()
        assert net.ns_name("t1") in removed and net.bridge in removed, removed
        assert left.wait(10) == -9
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert net.ns_name("t1") not in listed and live.ns_name("t2") in listed, listed
    finally:
        live.remove()
        net.remove()
        if left.poll() is None:
            left.kill()


STEP = r"""
import os, signal, socket, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
host, restart = socket.gethostname(), os.environ.get("SLURM_RESTART_COUNT", "0")
def log(what):
    os.write(fd, f"{time.time():.3f} {host} {restart} {what}\n".encode())
term_at = None
def on(sig, frame):
    global term_at
    log(signal.Signals(sig).name)
    if sig == signal.SIGTERM and term_at is None:
        term_at = time.time()
for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGCONT, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, on)
log("start")
while term_at is None or time.time() < term_at + 1.0:  # linger 1 s: USR2 may arrive after TERM
    time.sleep(0.05)
"""


def _events(path: Path) -> list[tuple[float, str, str, str]]:
    if not path.exists():
        return []
    return [(float(t), h, r, w) for t, h, r, w in (line.split() for line in path.read_text().splitlines())]


def test_preemption_requeues_with_user_signal(cluster: SlurmCluster, tmp_path: Path) -> None:
    """A `high` job preempts a `low` one: its steps get --signal's USR2 then TERM, it is requeued
    (same id, Restarts=1) and runs again after the high job; `scontrol requeue` does the same
    with TERM only."""
    sig_log = tmp_path / "signals.log"
    (tmp_path / "step.py").write_text(STEP)
    (tmp_path / "low.sh").write_text(f"""#!/bin/bash
#SBATCH -p low -N3 --exclusive --requeue --signal=USR2@60 --open-mode=append -o {tmp_path}/low.out
echo "batch start restart=${{SLURM_RESTART_COUNT:-0}}"
srun {PY} {tmp_path}/step.py {sig_log}
""")
    low = cluster.sbatch(str(tmp_path / "low.sh"))

    def started(restart: str) -> bool:
        return len({h for _, h, r, w in _events(sig_log) if w == "start" and r == restart}) == 3

    wait_until(lambda: started("0"), 30, "low job's 3 steps", cluster.logs)
    t0 = time.time()
    high = cluster.sbatch("-p", "high", "-N1", "-o", "/dev/null", "--wrap", "sleep 2")
    cluster.wait_job(high, {"RUNNING", "COMPLETING", "COMPLETED"}, timeout=30, poll=0.05)
    TIMINGS["preempt: high submit -> high running"] = time.time() - t0
    info = cluster.wait_job(low, {"PENDING"}, timeout=30, poll=0.05)
    assert info["Restarts"] == "1" and info["Requeue"] == "1", info
    TIMINGS["preempt: high submit -> low requeued (PENDING)"] = time.time() - t0
    t_high_end = None
    while not started("1"):
        if t_high_end is None and cluster.state(high) in ("COMPLETED", ""):
            t_high_end = time.time()
        assert time.time() - t0 < 60, f"low job not back: {cluster.job(low)}"
        time.sleep(0.1)
    TIMINGS["preempt: high submit -> low running again"] = time.time() - t0
    if t_high_end is not None:
        TIMINGS["preempt: high done -> low running again"] = time.time() - t_high_end
    first = [(h, w) for t, h, r, w in _events(sig_log) if r == "0" and w != "start"]
    for n in ("n1", "n2", "n3"):  # the user signal and the kill come together (GraceTime=0)
        mine = [w for h, w in first if h == n]
        assert "SIGUSR2" in mine and "SIGTERM" in mine, first  # their order is not fixed
    TIMINGS["preempt: high submit -> USR2 at steps"] = min(
        t for t, h, r, w in _events(sig_log) if w == "SIGUSR2") - t0  # fmt: skip
    assert cluster.job(low)["JobId"] == low
    wait_until(lambda: "PREEMPTED" in cluster.run(["sacct", "-D", "-X", "-n", "-P", "-j", low, "-o", "State"]).stdout,
               20, "sacct PREEMPTED record")  # fmt: skip

    # an explicit requeue (what submitit's checkpoint does): TERM to the steps, no USR2
    n_before = len(_events(sig_log))
    t1 = time.time()
    cluster.run(["scontrol", "requeue", low])
    cluster.wait_job(low, {"PENDING"}, timeout=30, poll=0.05)
    TIMINGS["scontrol requeue -> PENDING"] = time.time() - t1
    wait_until(lambda: started("2"), 60, "low job after scontrol requeue", cluster.logs)
    TIMINGS["scontrol requeue -> running again"] = time.time() - t1
    assert cluster.job(low)["Restarts"] == "2"
    second = [w for t, h, r, w in _events(sig_log)[n_before:] if r == "1"]
    assert "SIGTERM" in second and "SIGUSR2" not in second, second
    assert (tmp_path / "low.out").read_text().count("batch start") == 3
    cluster.run(["scancel", low])
    wait_done(cluster, low, timeout=30)


MPI_PROBE = r"""
import socket, sys
from mpi4py import MPI
c = MPI.COMM_WORLD
tok = c.bcast(f"tok-{socket.gethostname()}" if c.rank == 0 else None, root=0)
total = c.allreduce(c.rank)
print(f"MPI {sys.argv[1]} rank={c.rank} size={c.size} host={socket.gethostname()} bcast={tok} sum={total}", flush=True)
"""


@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="pip install mpi4py mpich")
def test_mpi_across_two_nodes(cluster: SlurmCluster, tmp_path: Path) -> None:
    """mpi4py on the `mpich` wheel: `srun --mpi=pmi2` and hydra's `mpirun` (it uses srun inside an
    allocation) both give one 2-rank world over n1 and n2. (`--mpi=pmix` needs libpmix-dev and
    gives nothing here: the wheel has no PMIx client.)"""
    assert "pmi2" in cluster.run(["srun", "--mpi=list"]).stdout + cluster.run(["srun", "--mpi=list"]).stderr
    probe = tmp_path / "mpi_probe.py"
    probe.write_text(MPI_PROBE)
    script = f"srun --mpi=pmi2 {PY} {probe} pmi2\n"
    if (BIN / "mpirun").exists():
        script += f"{BIN / 'mpirun'} -n 2 {PY} {probe} mpirun\n"
    t0 = time.monotonic()
    job = cluster.sbatch("-N2", "--ntasks-per-node=1", "-o", str(tmp_path / "%j.out"), "--wrap", script)
    info = wait_done(cluster, job, timeout=90)
    TIMINGS["MPI job (pmi2 + mpirun), total"] = time.monotonic() - t0
    out = (tmp_path / f"{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", out
    # hydra forwards output unbuffered: two ranks' lines can share a line
    found = re.findall(r"MPI (\w+) rank=(\d+) size=(\d+) host=(n\d) bcast=(tok-n\d) sum=(\d+)", out)
    for how in ["pmi2"] + (["mpirun"] if (BIN / "mpirun").exists() else []):
        rows = [r[1:] for r in found if r[0] == how]
        assert sorted(r[0] for r in rows) == ["0", "1"], out
        assert {(r[1], r[4]) for r in rows} == {("2", "1")}, out
        assert {r[2] for r in rows} == {"n1", "n2"}, out
        assert len({r[3] for r in rows}) == 1, out


@pytest.mark.skipif(importlib.util.find_spec("submitit") is None, reason="pip install submitit")
def test_submitit_two_node_job(cluster: SlurmCluster, tmp_path: Path) -> None:
    import socket

    import submitit

    def where(x: int) -> dict[str, Any]:
        env = submitit.JobEnvironment()
        return {"x": x, "host": socket.gethostname(), "rank": env.global_rank, "num_nodes": env.num_nodes,
                "hostnames": env.hostnames, "python": sys.executable}  # fmt: skip

    with cluster.activate():  # submitit runs sbatch / sacct with os.environ
        t0 = time.monotonic()
        executor = submitit.AutoExecutor(folder=tmp_path / "%j")
        assert executor.cluster == "slurm"
        executor.update_parameters(slurm_partition="low", nodes=2, tasks_per_node=1, timeout_min=5)
        job = executor.submit(where, 7)
        wait_until(job.done, 60, f"submitit job {job.job_id}", cluster.logs)
        results = job.results()
        TIMINGS["submitit submit -> results()"] = time.monotonic() - t0
    assert [r["rank"] for r in results] == [0, 1]
    assert {r["host"] for r in results} == set(results[0]["hostnames"]) and len(results[0]["hostnames"]) == 2
    assert all(r["num_nodes"] == 2 and r["x"] == 7 and r["python"] == sys.executable for r in results)
    submission = next(tmp_path.glob("*/*_submission.sh")).read_text()
    assert "#SBATCH --signal=USR2@90" in submission and re.search(rf"{re.escape(sys.executable)} -u -m submitit", submission)


@pytest.mark.skipif(importlib.util.find_spec("submitit") is None, reason="pip install submitit")
def test_node_results_of_a_job_that_lost_a_node(cluster: SlurmCluster, tmp_path: Path) -> None:
    """submitit's ``results()`` raises when one node left no result (as after a node died,
    with ``--no-kill`` keeping the job alive); ``node_results`` (used by ``submit --wait``)
    reports that node as None and keeps node 0's status, the run's."""
    import submitit

    from matrix_hpc.cluster.slurm.submitter import node_results

    def rank_1_dies() -> int:
        if submitit.JobEnvironment().global_rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(3)  # node 0 outlives it, as the driver outlives a dead worker node
        return 0

    with cluster.activate():
        executor = submitit.AutoExecutor(folder=tmp_path / "%j")
        executor.update_parameters(slurm_partition="low", nodes=2, tasks_per_node=1, timeout_min=5, slurm_srun_args=["--no-kill"])
        job = executor.submit(rank_1_dies)
        wait_until(job.done, 90, f"submitit job {job.job_id}", cluster.logs)
        with pytest.raises(submitit.core.utils.UncompletedJobError):
            job.results()
        assert node_results(job) == [0, None]
