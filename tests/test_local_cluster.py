"""A run without cluster.address gets a private Ray, even when RAY_ADDRESS points elsewhere
(or another `ray start` cluster runs on the machine), which ray.init would otherwise join."""

from __future__ import annotations

import pytest
import ray

from matrix_hpc.cluster import start_ray
from matrix_hpc.config import ClusterConfig
from matrix_hpc.services.llm.embedded import free_port


def test_private_cluster_ignores_ray_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")  # nothing listens there
    cluster = start_ray(ClusterConfig(num_cpus=1), "test-private")
    try:
        assert cluster.started_here and ray.is_initialized()
        assert str(ray.get(ray.put(41))) == "41"
    finally:
        cluster.shutdown()


def test_local_head_runs_only_the_daemons_a_run_uses() -> None:
    # Ray prestarts one Python worker per CPU for the first driver (~80 MB each); a run's
    # driver submits only actors, so those workers only ever sat idle. Its autoscaler monitor
    # and log monitor (~80 MB each) serve nothing in a run (fixed nodes, log_to_driver=False),
    # nor does its API server with include_dashboard=False (usage statistics only, ~115 MB).
    import time
    from pathlib import Path

    import psutil

    cluster = start_ray(ClusterConfig(num_cpus=2), "test-prestart")
    try:
        mine = psutil.Process().children(recursive=True)
        raylet = next(p for p in mine if "raylet" in " ".join(p.cmdline()[:1]))
        daemons = " ".join(" ".join(p.cmdline()[:3]) for p in mine)
        assert "gcs_server" in daemons and ("DashboardAgent" in daemons or "dashboard/agent.py" in daemons), daemons  # the rest still starts
        assert "monitor.py" not in daemons and "log_monitor" not in daemons and "dashboard.py" not in daemons, daemons

        def idle() -> list[str]:
            return [n for p in raylet.children() if (n := " ".join(p.cmdline()[:1])).startswith("ray::IDLE") or "default_worker.py" in n]

        # Prestarted workers appear within ~2 s of ray.init on this machine; give them 8.
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and not idle():
            time.sleep(0.25)
        assert not idle(), idle()

        @ray.remote
        class Probe:
            def ping(self) -> int:
                print("probe-output-marker", flush=True)
                return 1

        assert ray.get(Probe.remote().ping.remote()) == 1  # actors still get their workers
        # Without the log monitor an actor's output still lands in the session's logs.
        logs = Path(cluster.session_dir or "") / "logs"
        deadline = time.monotonic() + 30
        while not any("probe-output-marker" in f.read_text(errors="replace") for f in logs.glob("worker-*.out")):
            assert time.monotonic() < deadline, sorted(p.name for p in logs.iterdir())
            time.sleep(0.25)
    finally:
        cluster.shutdown()
