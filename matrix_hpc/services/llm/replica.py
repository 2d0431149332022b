"""One managed LLM server replica, owned by a Ray actor on the node it serves from.

The actor starts the server process (embedded CPU engine or vLLM), restarts it on
request, and stops it. The process dies with the actor (``PR_SET_PDEATHSIG``), so
a lost actor never leaves an engine holding a GPU. Health is judged from outside
(by the registry, with real generations): a hung engine cannot vouch for itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import ray

from ...config import EmbeddedEngineConfig, VLLMConfig
from ...credentials import read_secret
from ...labels import GPU_NODE, node_host, placement
from .base import LLMServer
from .status import ReplicaInfo

__all__ = ["LLMReplica", "ReplicaSpec", "make_server", "replica_options"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaSpec:
    """What a replica runs: the model's typed engine settings travel to the actor as they are."""

    kind: Literal["embedded", "vllm"]
    model: str
    """Served model name (what requests ask for)."""
    log_dir: str
    settings: EmbeddedEngineConfig | VLLMConfig = field(default_factory=EmbeddedEngineConfig)
    """The engine's section of the model's config (``embedded`` or ``vllm``)."""
    startup_timeout_s: float = 60.0
    model_key: str = "default"
    """The model's key in ``models`` (names the replica's actor and log)."""
    gpus: int = 0
    """GPUs one replica claims from Ray (``ModelConfig.replica_gpus``): Ray places it where they are."""
    api_key_file: str | None = None
    """The run's API key for its servers (a 0600 file every node reads; the path travels, never
    the key: see matrix_hpc.credentials). None: the server takes requests without a key."""


def make_server(spec: ReplicaSpec, host: str, port: int | None = None) -> LLMServer:
    s = spec.settings
    api_key = read_secret(spec.api_key_file) if spec.api_key_file else None
    if isinstance(s, EmbeddedEngineConfig):
        from .embedded import EmbeddedEngine

        return EmbeddedEngine(s.model_path, s.n_parallel, s.ctx_per_slot, s.threads, spec.log_dir, host, port, spec.model, api_key)
    from .vllm import VLLMServer

    assert s.model is not None  # checked when the config loads
    kwargs: dict[str, Any] = {"tensor_parallel_size": s.tensor_parallel_size, "pipeline_parallel_size": s.pipeline_parallel_size, "device": s.device}
    if s.max_model_len is not None:
        kwargs["max_model_len"] = s.max_model_len
    if s.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization
    pipeline = ["--distributed-executor-backend", "ray"] if s.pipeline_parallel_size > 1 else []
    return VLLMServer(
        s.model, spec.model, env=dict(s.env), log_dir=spec.log_dir, host=host, port=port,
        python=s.python or sys.executable, extra_args=[*pipeline, *s.extra_args], api_key=api_key, **kwargs,
    )  # fmt: skip


def replica_options(spec: ReplicaSpec, name: str, namespace: str) -> dict[str, Any]:
    """Ray actor options: GPUs for the server, on GPU-labelled nodes when there are some;
    re-created wherever it fits. Replicas that claim no GPU are spread over those nodes (a
    node's death takes as few as it can); GPU ones are spread by their GPUs, and packing
    leaves whole nodes free for replicas that need several."""
    opts: dict[str, Any] = {
        "name": name, "namespace": namespace, "num_cpus": 0, "num_gpus": spec.gpus, "resources": placement(GPU_NODE), "max_restarts": -1,
    }  # fmt: skip
    if spec.gpus == 0:
        opts["scheduling_strategy"] = "SPREAD"
    return opts


@ray.remote
class LLMReplica:
    """Owns one server process.

    An async actor: its event loop thread lives as long as the actor, and the server
    is spawned from it, because ``PR_SET_PDEATHSIG`` fires when the *thread* that
    spawned the child ends (a pool thread would take the server down with it).
    Waiting for readiness runs in a helper thread so ``info`` answers meanwhile.
    """

    def __init__(self, spec: ReplicaSpec, index: int) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.spec = spec
        self.index = index
        self.host = node_host()
        self.server: LLMServer | None = None
        self.starts = 0
        self.started_at: float | None = None

    async def start(self) -> str:
        """Start (or restart) the server and wait until it completes a real generation; returns its URL."""
        port = None
        if self.server is not None:
            port = getattr(self.server, "port", None)  # same URL again: sticky routes stay valid
            await asyncio.to_thread(self.server.stop)
        Path(self.spec.log_dir).mkdir(parents=True, exist_ok=True)
        server = self.server = make_server(self.spec, self.host, port)
        server.start()  # on the loop thread: see the class docstring
        self.starts += 1
        try:
            await asyncio.to_thread(server.wait_ready, self.spec.startup_timeout_s)
        except Exception:
            await asyncio.to_thread(server.stop)
            raise
        self.started_at = time.time()
        return server.base_url

    async def alive(self) -> bool:
        # In a thread: VLLMServer.alive() may spend seconds clearing a dead server's orphans.
        return self.server is not None and await asyncio.to_thread(self.server.alive)

    async def info(self) -> ReplicaInfo:
        srv = self.server
        ctx = ray.get_runtime_context()
        return ReplicaInfo(
            index=self.index, kind=self.spec.kind, url=srv.base_url if srv else None, pid=getattr(srv, "pid", None),
            log=getattr(srv, "log_path", None), starts=self.starts, alive=await self.alive(), node_ip=self.host,
            host=socket.gethostname(), node_id=ctx.get_node_id(), gpus=self.spec.gpus,
            gpu_ids=[str(g) for g in ctx.get_accelerator_ids().get("GPU", [])], actor_pid=os.getpid(),
        )  # fmt: skip

    async def stop(self) -> None:
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)
