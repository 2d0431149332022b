"""Another user's host on the test Slurm cluster tries a running job (see tests/outsider.py).

The outsider is a node of the bridge that is not in the job; it has no token and no key.
It tries to join the job's Ray cluster, to call each of its ports that other hosts can
reach, and to chat with each managed LLM endpoint; as another uid on the shared
filesystem it tries to read the token and key files. Every socket of the job listens on
its node's address or on loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .conftest import REPO
from .listening import Listener, descendants, listeners, loopback
from .slurm_cluster import SlurmCluster

__all__ = ["probe_running_job"]

OUTSIDER = [sys.executable, str(REPO / "tests" / "outsider.py")]

UNBOUND_METRICS = ("ray::DashboardAgent", "ray/dashboard/dashboard.py")
"""Ray's Prometheus endpoints (each node's metrics export port; on the head, the dashboard's on
44227) listen on every interface when the node address is not loopback, and answer without a
token: read-only metrics (docs/security.md names them). The autoscaler's (44217) is not started."""

UNUSED_DAEMONS = ("ray/autoscaler/_private/monitor.py", "ray/_private/log_monitor.py")
"""Ray daemons a run never uses (cluster/ray_settings.py HEAD_DAEMONS_OFF): no node runs them."""


def _nspid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    return pid


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _job_pids(cluster: SlurmCluster, node: str, cfg: Path) -> list[int]:
    """Host pids of the job's processes on ``node``: its bootstrap (found by its config file) and all below."""

    def bootstrap(pid: int) -> bool:  # the task itself, not srun's command line that names it (srun is Slurm's)
        argv = _cmdline(pid).split()
        return bool(argv) and Path(argv[0]).name.startswith("python") and "matrix_hpc.cluster.slurm.bootstrap" in argv and str(cfg) in argv

    return sorted({d for r in cluster.node_pids(node) if bootstrap(r) for d in descendants(r)})


def _as_outsider(cluster: SlurmCluster, node: str, home: Path, *args: str, timeout: float = 300) -> Any:
    """Run tests/outsider.py on ``node`` with nothing of ours: a bare environment and its own HOME."""
    env = ["env", "-i", f"HOME={home}", f"PATH={os.environ['PATH']}"]
    res = cluster.node_exec(node, [*env, *OUTSIDER, *args], timeout=timeout, check=False)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _unreadable_by_nobody(path: Path) -> bool:
    """Whether uid ``nobody`` is refused the file by its own mode: it is read through a hard link
    in a folder everyone may enter (pytest's own temp folders are closed to others already)."""
    dev = path.stat().st_dev
    top = Path("/tmp") if Path("/tmp").stat().st_dev == dev else path  # a folder everyone may enter, on the file's filesystem
    while top != Path("/tmp") and top.parent != top and top.parent.stat().st_dev == dev:
        top = top.parent
    folder = Path(tempfile.mkdtemp(dir=top, prefix="mhpc-link-"))
    try:
        os.chmod(folder, 0o755)
        link = folder / path.name
        os.link(path, link)
        res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", str(link)], capture_output=True, text=True, timeout=30)
        opened = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", str(folder / "probe")], capture_output=True, text=True, timeout=30, input=""
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    # The folder itself is open to nobody (its ancestors too, or the probe file's error would say so).
    return res.returncode != 0 and "Permission denied" in res.stderr and not res.stdout and "No such file" in opened.stderr


def probe_running_job(cluster: SlurmCluster, cfg: Path, out: Path, job_dir: Path, nodes: tuple[str, str], outsider: str) -> tuple[str, str]:
    """Hold the job's driver once its run is running (its cluster and engines keep serving), try
    everything as the outsider, let it go; returns the job's Ray token and API key."""

    def running() -> dict[str, Any] | None:
        try:
            info = json.loads((out / "run.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return info if info.get("status") == "running" else None

    deadline = time.monotonic() + 300
    while (info := running()) is None:  # polled often: a run of a few rows is over within a second or two
        assert time.monotonic() < deadline, "the job's run did not start in 300 s"
        time.sleep(0.02)
    head, worker = nodes
    (driver,) = [p for p in cluster.node_pids(head) if _nspid(p) == info["driver_pid"] and "bootstrap" in _cmdline(p)]
    os.kill(driver, signal.SIGSTOP)
    try:
        return _probe(cluster, info, cfg, job_dir, nodes, outsider, out.parent / "outsider-home")
    finally:
        os.kill(driver, signal.SIGCONT)


def _probe(cluster: SlurmCluster, info: dict[str, Any], cfg: Path, job_dir: Path, nodes: tuple[str, str], outsider: str, home: Path) -> tuple[str, str]:
    # The secrets: 0600 files in 0700 folders of the shared filesystem, unreadable by another uid.
    (token_file,) = (job_dir / ".secrets").glob("ray-*.token")
    key_files = {e["api_key_file"] for e in info["llm"]}
    assert len(key_files) == 1, info["llm"]
    key_file = Path(key_files.pop())
    for f in (token_file, key_file):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600 and stat.S_IMODE(f.parent.stat().st_mode) == 0o700, f
        assert _unreadable_by_nobody(f), f
    token, key = token_file.read_text().strip(), key_file.read_text().strip()
    assert len(token) == 64 and len(key) == 64 and token != key

    # Every socket of the job: on its node's address (what other nodes reach) or loopback; the
    # few Ray cannot bind (its metrics endpoints) listen everywhere.
    reachable: dict[str, Listener] = {}
    for node in nodes:
        pids = _job_pids(cluster, node, cfg)
        assert not [c for p in pids if any(d in (c := _cmdline(p)) for d in UNUSED_DAEMONS)], node
        socks = listeners(pids)
        assert socks, node
        addr = cluster.node_addr[node]
        for s in socks:
            if loopback(s.host):
                continue
            assert s.host in (addr, "0.0.0.0", "::"), str(s)  # what listens everywhere is probed below
            reachable[f"{addr}:{s.port}"] = s
    assert info["ray_address"] in reachable

    # From the outsider host: each reachable gRPC port refuses a call without the token (none
    # lets one in); what is not gRPC is one of Ray's metrics endpoints or an LLM endpoint.
    driver_ports = {f"{cluster.node_addr[nodes[0]]}:{s.port}" for s in reachable.values() if _nspid(s.pid) == info["driver_pid"]}
    codes = _as_outsider(cluster, outsider, home, "grpc", *[t for t in reachable if t not in driver_ports])
    llm_ports = {e["url"].split("//")[1].split("/")[0] for e in info["llm"]}
    answered_metrics: list[str] = []
    let_in: dict[str, Any] = {}
    refused = set()
    for target, methods in codes.items():
        names = set(methods.values())
        if names - {"UNAUTHENTICATED", "UNIMPLEMENTED", "UNAVAILABLE"}:
            let_in[str(reachable[target])] = methods
        elif "UNAUTHENTICATED" in names:
            refused.add(target)
        elif target not in llm_ports:  # not gRPC, not an LLM endpoint (checked below): HTTP that refuses, or metrics
            got = _as_outsider(cluster, outsider, home, "http", f"http://{target}/")
            metrics = got["status"] == 200 and "# TYPE " in got.get("body", "") and any(m in reachable[target].name for m in UNBOUND_METRICS)
            if got["status"] != 401 and not metrics:
                let_in[str(reachable[target])] = got
            elif metrics:
                answered_metrics.append(got["body"])
    assert not let_in and info["ray_address"] in refused, let_in

    # Joining the job's Ray cluster without the token: refused.
    joined = _as_outsider(cluster, outsider, home, "join", info["ray_address"])
    assert joined["refused"] and not joined["joined"], joined["log"]

    # Each managed LLM endpoint answers 401 to a chat without the key.
    for e in info["llm"]:
        chat = json.dumps({"model": e["served_model"], "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
        assert _as_outsider(cluster, outsider, home, "http", f"{e['url']}/chat/completions", "--json", chat)["status"] == 401, e["url"]
    # What the metrics endpoints tell anyone holds neither secret.
    assert not [m for m in answered_metrics if token in m or key in m]
    return token, key
