"""Ray resource names that mark a node's kind, shared by the cluster and the services.

Every node of a matrix-hpc cluster advertises one or both (a large amount, so
that any number of actors fits): LLM and sandbox replicas ask for a sliver of
``GPU_NODE``, agent actors for a sliver of ``CPU_NODE``. A node of a homogeneous
allocation (and a local machine) advertises both.
"""

from __future__ import annotations

import os

__all__ = ["CPU_NODE", "GPU_NODE", "HEAD_NODE", "NODE_IP_ENV", "node_host", "node_resources", "on_driver_node", "placement"]

GPU_NODE = "matrix_gpu_node"
CPU_NODE = "matrix_cpu_node"
HEAD_NODE = "matrix_head_node"
"""Only the node the driver runs on (the Ray head: rank 0 on Slurm, the local machine)."""
NODE_IP_ENV = "MATRIX_HPC_NODE_IP"
"""Set by the per-node bootstrap: the address a node's servers bind to and advertise."""

_AMOUNT = 10_000


def node_resources(kinds: set[str]) -> dict[str, float]:
    """What a node of ``kinds`` ({"gpu", "cpu"}, plus "head" for the driver's node) advertises."""
    names = {"gpu": GPU_NODE, "cpu": CPU_NODE, "head": HEAD_NODE}
    return {names[k]: float(_AMOUNT) for k in sorted(kinds)}


def placement(resource: str) -> dict[str, float]:
    """Actor ``resources=`` that pin it to nodes advertising ``resource``, if any node does."""
    import ray

    return {resource: 0.001} if ray.cluster_resources().get(resource) else {}


def on_driver_node() -> dict[str, object]:
    """Actor options that keep it on the driver's node (the one advertising ``HEAD_NODE``;
    anywhere on a Ray cluster started by hand, which has no such node).

    For the run's control actors (the sink, the LLM registries): the driver's node
    going down ends the run anyway, so there they never die alone with a worker node.
    (A resource, not a soft node affinity: Ray placed such an actor on another node.)
    """
    return {"resources": placement(HEAD_NODE)}


def node_host() -> str:
    """The address a server started here binds to and advertises to the other nodes.

    The bootstrap's ``NODE_IP_ENV``; else loopback when the Ray cluster is this one
    machine; else this node's Ray address (a cluster started by hand): never loopback
    when another node must reach it.
    """
    ip = os.environ.get(NODE_IP_ENV)
    if ip:
        return ip
    import ray

    if sum(1 for n in ray.nodes() if n.get("Alive")) <= 1:
        return "127.0.0.1"
    return ray.util.get_node_ip_address()
