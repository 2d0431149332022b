"""A run admits no one but its owner: tried as another user of the machine would.

During one real local run (collab workflow, embedded engine) an outsider process, with its
own HOME and none of the run's variables (tests/outsider.py), tries to join the run's Ray
cluster, to call every gRPC port of it, and to chat with its engine; every listening socket
of the run is on loopback; the run's Ray token and API key end up in no file it leaves.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import BIN, REPO, job_config, questions, store_records, wait_for, write_jsonl
from .listening import descendants, listeners, loopback
from .outsider import outsider_env

pytestmark = pytest.mark.slow

OUTSIDER = [sys.executable, str(REPO / "tests" / "outsider.py")]


def _running(out: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((out / "run.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return info if info.get("status") == "running" else None


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode(errors="replace").split("=", 1) for e in raw if b"=" in e)


def test_a_local_run_admits_no_one_else(tmp_path: Path, run_factory: Any) -> None:
    rows = questions(16)
    cfg = job_config(tmp_path, write_jsonl(tmp_path / "data.jsonl", rows), **{"run.max_in_flight": 4, "llm.embedded.n_parallel": 4})
    out = tmp_path / "out"
    old_umask = os.umask(0o027)  # the user's: the run's files and folders take it (no more open than it allows)
    try:
        run = run_factory(cfg)
    finally:
        os.umask(old_umask)
    wait_for(lambda: _running(out) is not None, 240, "the run to start", run)
    # The driver is held while the outsider tries (its cluster and engine keep serving), so the
    # probes meet a live run however fast the machine finishes 16 rows.
    os.kill(run.proc.pid, signal.SIGSTOP)
    try:
        info = _running(out)
        assert info is not None
        token, key = _probe_as_outsider(tmp_path, run, info)
    finally:
        os.kill(run.proc.pid, signal.SIGCONT)

    assert run.wait(600) == 0, run.output[-3000:]
    records = store_records(out)
    assert sorted(r["id"] for r in records) == sorted(q["id"] for q in rows) and all(r["status"] == "ok" for r in records)
    # Neither secret is in any file the run leaves (run.json, logs, the store, Ray's logs), nor on its terminal.
    (endpoint,) = info["llm"]
    assert not Path(endpoint["api_key_file"]).exists()
    ray_logs = Path(json.loads((out / "run.json").read_text())["ray_logs"])
    files = [p for folder in (out, ray_logs) for p in folder.rglob("*") if p.is_file()]
    leaked = [str(p) for p in files if token.encode() in p.read_bytes() or key.encode() in p.read_bytes()]
    assert len(files) > 10 and not leaked, leaked
    # The store, the journal and the logs: nothing open to others under umask 027.
    too_open = [f"{p} {oct(p.stat().st_mode & 0o777)}" for p in [out, *out.rglob("*")] if p.stat().st_mode & 0o007]
    assert not too_open, too_open
    assert token not in run.output and key not in run.output


def _probe_as_outsider(tmp_path: Path, run: Any, info: dict[str, Any]) -> tuple[str, str]:
    """Every try of the outsider on the held run; returns the run's Ray token and API key."""
    (endpoint,) = info["llm"]
    key_file = Path(endpoint["api_key_file"])
    # The driver put the token in its environment for the Ray processes it started (the GCS's shows it).
    pids = descendants(run.proc.pid)
    gcs = [pid for pid in pids if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"gcs_server")]
    token = _environ(gcs[0]).get("RAY_AUTH_TOKEN", "") if gcs else ""
    key = key_file.read_text().strip()
    assert len(token) == 64 and len(key) == 64 and token != key
    # Readable by the owner only: the key file and its folder.
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    env = outsider_env(tmp_path / "outsider-home")

    # Every socket the run listens on is on loopback (the GCS listened on '::', Ray's agents on 0.0.0.0).
    sockets = listeners(pids)
    assert sockets and all(loopback(s.host) for s in sockets), "\n".join(map(str, sockets))
    gcs_port = int(str(info["ray_address"]).rsplit(":", 1)[1])
    assert gcs_port in {s.port for s in sockets}

    # Each gRPC port of the run (GCS, raylet, object manager, actors, agents) refuses a call
    # without the token; none lets one in. (The held driver answers nothing; its core worker
    # serves what every actor's does.)
    targets = {f"127.0.0.1:{s.port}": s for s in sockets if s.pid != run.proc.pid}
    probe = subprocess.run([*OUTSIDER, "grpc", *targets], env=env, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-2000:]
    refused, let_in = set(), {}
    for target, codes in json.loads(probe.stdout).items():
        if set(codes.values()) - {"UNAUTHENTICATED", "UNIMPLEMENTED", "UNAVAILABLE"}:  # UNAVAILABLE: it does not speak gRPC
            let_in[str(targets[target])] = codes
        elif "UNAUTHENTICATED" in codes.values():
            refused.add(targets[target].port)
    assert not let_in and gcs_port in refused, let_in
    assert {s.port for s in sockets if "raylet" in s.name} & refused and {s.port for s in sockets if "ray::" in s.name} & refused

    # Joining the cluster (and running code in it) without the token: refused.
    joined = subprocess.run([*OUTSIDER, "join", info["ray_address"]], env=env, capture_output=True, text=True, timeout=300)
    assert json.loads(joined.stdout)["refused"] and not json.loads(joined.stdout)["joined"], joined.stdout + joined.stderr[-2000:]

    # The engine answers 401 to a chat without the key; the run's own check-health has the key.
    chat = json.dumps({"model": endpoint["served_model"], "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
    probe = subprocess.run([*OUTSIDER, "http", f"{endpoint['url']}/chat/completions", "--json", chat], env=env, capture_output=True, text=True, timeout=120)
    assert json.loads(probe.stdout)["status"] == 401, probe.stdout + probe.stderr
    health = subprocess.run([str(BIN / "matrix-hpc"), "check-health", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert health.returncode == 0 and "1/1 endpoints generate" in health.stdout, health.stdout + health.stderr
    return token, key


def test_no_code_path_turns_ray_auth_off() -> None:
    """Neither the package nor the launch scripts set RAY_AUTH_MODE=disabled (all three cluster
    starts did: local.py, slurm/raynode.py, slurm/bootstrap.py)."""
    files = [p for root in ("matrix_hpc", "sbatch") for p in (REPO / root).rglob("*") if p.suffix in (".py", ".sbatch", ".sh")]
    hits = [f"{p}:{n}" for p in files for n, line in enumerate(p.read_text().splitlines(), 1) if "RAY_AUTH_MODE" in line and "disabled" in line]
    assert files and not hits, hits
