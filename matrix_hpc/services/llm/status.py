"""The state of one LLM endpoint, as the registry reports it and run.json / ``matrix-hpc status`` show it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["EndpointStatus", "ReplicaInfo"]


@dataclass(frozen=True)
class ReplicaInfo:
    """A managed replica's own account of itself (``LLMReplica.info``): its server and its placement."""

    index: int
    kind: str
    """The engine (``vllm``, ``embedded``)."""
    url: str | None
    """Its server's URL; None before the first start."""
    pid: int | None
    log: str | None
    starts: int
    alive: bool
    node_ip: str
    host: str
    node_id: str
    gpus: int
    gpu_ids: list[str]
    actor_pid: int


@dataclass
class EndpointStatus:
    model: str
    """The model's key in ``models``."""
    url: str
    replica: int | None
    """Index of the managed replica serving it; None for an external endpoint."""
    state: str = "up"
    """``up`` (routable), ``down`` (failing probes), ``restarting``, or ``failed`` (given up)."""
    failures: int = 0
    restarts: int = 0
    probes: int = 0
    last_error: str | None = None
    last_ok_at: float | None = None
    restarted_at: float | None = None
    slow_probes: int = 0
    """Probes that timed out while requests kept completing here (busy, not counted as failures)."""
    completed: int = 0
    """Requests the clients reported completed here (counted while this registry lives)."""
    last_completed_at: float | None = None
    """When the registry last heard of a completion here (busy but alive: see the registry)."""
    served_model: str | None = None
    """What requests ask this endpoint for."""
    api_key_file: str | None = None
    """Where the key this endpoint takes is (a 0600 file; ``check-health`` reads it); None: no key
    of the run's (an external endpoint's key comes from its ``api_key_env``)."""
    # Of a managed replica (from its actor; None for an external endpoint or an unreachable actor):
    kind: str | None = None
    pid: int | None = None
    log: str | None = None
    starts: int | None = None
    alive: bool | None = None
    node_ip: str | None = None
    host: str | None = None
    """The node the replica runs on (its placement)."""
    node_id: str | None = None
    """Ray's id of that node (tells apart nodes that share a host name)."""
    gpus: int | None = None
    """GPUs the replica claimed from Ray."""
    gpu_ids: list[str] | None = None
    """The GPUs Ray gave the replica (``ray.get_runtime_context().get_accelerator_ids()``)."""
    actor_pid: int | None = None
    info_error: str | None = None

    def with_replica(self, info: ReplicaInfo) -> EndpointStatus:
        """This status with the replica's own account (its url and index are this status's already)."""
        own = {f.name: getattr(info, f.name) for f in dataclasses.fields(ReplicaInfo) if f.name not in ("url", "index")}
        return dataclasses.replace(self, **own)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EndpointStatus:
        """From run.json or services.json (unknown keys of other versions are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names and k != "model"}, model=str(data.get("model") or "default"))
