"""Ports for one Ray node that no other job or user on the node is using.

Ray's defaults (6379, 10001, 52365, workers from 10002) collide as soon as two
jobs share a node. Every port is taken from the kernel (bind to 0), so two
jobs, or two users, get different ones; worker ports are a block checked free.
"""

from __future__ import annotations

import random
import socket
from contextlib import ExitStack
from dataclasses import dataclass

__all__ = ["RayPorts", "pick_ports"]

_SINGLE = ("gcs", "node_manager", "object_manager", "runtime_env_agent", "dashboard_agent_grpc", "dashboard_agent_listen", "metrics_export", "client_server")


@dataclass(frozen=True)
class RayPorts:
    gcs: int
    node_manager: int
    object_manager: int
    runtime_env_agent: int
    dashboard_agent_grpc: int
    dashboard_agent_listen: int
    metrics_export: int
    client_server: int
    min_worker: int
    max_worker: int

    def args(self, head: bool) -> list[str]:
        """``ray start`` flags for these ports."""
        out = [
            f"--node-manager-port={self.node_manager}", f"--object-manager-port={self.object_manager}",
            f"--runtime-env-agent-port={self.runtime_env_agent}", f"--dashboard-agent-grpc-port={self.dashboard_agent_grpc}",
            f"--dashboard-agent-listen-port={self.dashboard_agent_listen}", f"--metrics-export-port={self.metrics_export}",
            f"--min-worker-port={self.min_worker}", f"--max-worker-port={self.max_worker}",
        ]  # fmt: skip
        if head:
            out += [f"--port={self.gcs}", f"--ray-client-server-port={self.client_server}"]
        return out


def _free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def pick_ports(host: str, workers: int = 64, avoid: set[int] | None = None) -> RayPorts:
    """Distinct free ports on ``host`` (held together while picked, so none repeats), none in ``avoid``
    (ports this process holds already)."""
    with ExitStack() as stack:
        singles = []
        for _ in _SINGLE:
            s = stack.enter_context(socket.socket())
            s.bind((host, 0))
            singles.append(s.getsockname()[1])
    taken = set(singles) | (avoid or set())
    for _ in range(200):
        lo = random.randrange(20000, 60000 - workers)
        block = range(lo, lo + workers)
        if taken.isdisjoint(block) and all(_free(host, p) for p in block[:: max(1, workers // 8)]):
            return RayPorts(*singles, min_worker=lo, max_worker=lo + workers - 1)
    raise RuntimeError(f"no free block of {workers} worker ports on {host}")
