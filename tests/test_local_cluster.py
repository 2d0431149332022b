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
