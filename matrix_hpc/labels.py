"""Ray resource names that mark a node's kind, shared by the cluster and the services.

Every node of a matrix-hpc cluster advertises one or both (a large amount, so
that any number of actors fits): LLM and sandbox replicas ask for a sliver of
``GPU_NODE``, agent actors for a sliver of ``CPU_NODE``. A node of a homogeneous
allocation (and a local machine) advertises both.
"""

from __future__ import annotations

__all__ = ["CPU_NODE", "GPU_NODE", "NODE_IP_ENV", "node_resources", "placement"]

GPU_NODE = "matrix_gpu_node"
CPU_NODE = "matrix_cpu_node"
NODE_IP_ENV = "MATRIX_HPC_NODE_IP"
"""Set by the per-node bootstrap: the address a node's servers bind to and advertise."""

_AMOUNT = 10_000


def node_resources(kinds: set[str]) -> dict[str, float]:
    """What a node of ``kinds`` ({"gpu", "cpu"}) advertises."""
    names = {"gpu": GPU_NODE, "cpu": CPU_NODE}
    return {names[k]: float(_AMOUNT) for k in sorted(kinds)}


def placement(resource: str) -> dict[str, float]:
    """Actor ``resources=`` that pin it to nodes advertising ``resource``, if any node does."""
    import ray

    return {resource: 0.001} if ray.cluster_resources().get(resource) else {}
