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


def test_no_idle_workers_are_prestarted() -> None:
    # Ray prestarts one Python worker per CPU for the first driver (~80 MB each); a run's
    # driver submits only actors, so those workers only ever sat idle.
    import time

    import psutil

    cluster = start_ray(ClusterConfig(num_cpus=2), "test-prestart")
    try:
        raylet = next(p for p in psutil.Process().children(recursive=True) if "raylet" in " ".join(p.cmdline()[:1]))

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
                return 1

        assert ray.get(Probe.remote().ping.remote()) == 1  # actors still get their workers
    finally:
        cluster.shutdown()
