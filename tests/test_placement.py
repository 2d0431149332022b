"""Replicas placed by the GPUs they need, on a real multi-node Ray cluster (several raylets here).

Two GPU nodes with two logical GPUs each: a model whose replica needs two GPUs and a
model with two one-GPU replicas. Placed together, the big replica holds a whole node
and both small ones the other; a replica that fits nowhere fails with a line naming
its model instead of waiting forever. Only placement: no engine is started.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from ray.cluster_utils import Cluster

from matrix_hpc.cluster.auth import RayAuth
from matrix_hpc.config import ModelConfig
from matrix_hpc.labels import GPU_NODE
from matrix_hpc.services.llm import ServerStartError
from matrix_hpc.services.llm.service import LLMServices

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gpu_nodes() -> Iterator[list[str]]:
    # Token auth as a run has it, set through the run's own helper: it also makes this process's
    # Ray read the mode again (an earlier in-process ray.init of the session left its own cached).
    auth = RayAuth(token=secrets.token_hex(32))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    nodes = [cluster.add_node(num_cpus=1, num_gpus=2, resources={GPU_NODE: 10_000}) for _ in range(2)]
    ray.init(address=cluster.address, namespace="placement-test", log_to_driver=False)
    cluster.wait_for_nodes()
    try:
        yield [n.node_id for n in nodes]
    finally:
        ray.shutdown()
        cluster.shutdown()
        auth.restore()


def _placed(services: LLMServices) -> list[dict[str, Any]]:
    """Each replica's model, node and GPUs, from the replica actors themselves."""
    out = []
    for name, svc in services.services.items():
        for i in range(svc.config.replicas):
            info = ray.get(ray.get_actor(f"{svc.registry_name}/{i}", namespace="placement-test").info.remote())
            out.append({"model": name, "node": info.node_id, "gpus": info.gpus, "gpu_ids": info.gpu_ids})
    return out


def _stop(services: LLMServices) -> None:
    for svc in services.services.values():
        for i in range(svc.config.replicas):
            try:
                ray.kill(ray.get_actor(f"{svc.registry_name}/{i}", namespace="placement-test"))
            except ValueError:  # never created
                pass
        ray.kill(svc.registry)


def test_bigger_replicas_are_placed_first_and_each_where_its_gpus_are(gpu_nodes: list[str], tmp_path: Path) -> None:
    # Declared small first: placement must not follow the declaration order.
    models = {"small": ModelConfig(gpus_per_replica=1, replicas=2, model="small"), "big": ModelConfig(gpus_per_replica=2, model="big")}
    services = LLMServices(models, "p1", "placement-test", tmp_path)
    try:
        services.place()
        placed = _placed(services)
    finally:
        _stop(services)
    big = [p for p in placed if p["model"] == "big"]
    small = [p for p in placed if p["model"] == "small"]
    assert len(big) == 1 and big[0]["gpus"] == 2 and len(big[0]["gpu_ids"]) == 2, placed
    assert len(small) == 2 and {len(p["gpu_ids"]) for p in small} == {1}, placed
    assert {p["node"] for p in small} == set(gpu_nodes) - {big[0]["node"]}, placed  # the other node, both of them
    assert len({tuple(p["gpu_ids"]) for p in small}) == 2  # two different GPUs


def test_a_replica_that_fits_nowhere_fails_naming_its_model(gpu_nodes: list[str], tmp_path: Path) -> None:
    services = LLMServices({"huge": ModelConfig(gpus_per_replica=3, model="huge")}, "p2", "placement-test", tmp_path)
    try:
        with pytest.raises(ServerStartError, match=r"model 'huge' could not be placed: .*needing 3 GPU\(s\)"):
            services.place(timeout_s=5.0)
    finally:
        _stop(services)


def test_slurm_nodes_advertise_the_gpus_slurm_gave_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from matrix_hpc.cluster.slurm.node import node_gpus

    monkeypatch.delenv("SLURM_GPUS_ON_NODE", raising=False)
    assert node_gpus(0) is None  # nothing said: Ray detects devices itself
    assert node_gpus(2) == 2  # cluster.slurm.gpus_per_node (logical GPUs on test nodes)
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "4")
    assert node_gpus(2) == 4  # what Slurm gave this node wins
