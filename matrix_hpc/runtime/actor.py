"""The Ray actor that hosts one instance of a role.

It accepts task batches (``receive`` only enqueues), runs up to ``concurrency``
tasks at once through the role's :class:`Agent`, and hands each task straight to
an actor of its next role, or, once finished, to the sink, through a batching
:class:`Outbox`. Peers are found by name, so a restarted actor rejoins alone.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray

from ..services.llm import ChatClient
from ..services.llm.registry import follow_registry
from ..store import RecordRow
from .agent import Agent, AgentContext, run_step
from .outbox import Outbox
from .task import Task

__all__ = ["AgentActor", "RoleSpec", "TeamSpec", "actor_name", "load_object", "sink_name"]

log = logging.getLogger(__name__)

SINK = "__sink__"


def actor_name(run_id: str, role: str, index: int) -> str:
    return f"{run_id}/{role}/{index}"


def sink_name(run_id: str) -> str:
    return f"{run_id}/{SINK}"


def load_object(path: str) -> Any:
    """Import ``module:attr``."""
    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"cannot load {path!r}: {exc}") from exc


@dataclass(frozen=True)
class RoleSpec:
    agent: str
    instances: int
    concurrency: int
    params: dict[str, Any] = field(default_factory=dict)
    inline: bool = False


@dataclass(frozen=True)
class TeamSpec:
    """Everything an actor needs to find its peers and talk to the LLM."""

    run_id: str
    namespace: str
    roles: dict[str, RoleSpec]
    llm_urls: list[str]
    llm_model: str
    llm_api_key_env: str | None
    llm_timeout_s: float
    llm_max_retries: int
    llm_retry_backoff_s: float
    llm_max_connections: int
    llm_max_tokens: int
    llm_temperature: float
    batch_size: int
    batch_wait_s: float
    llm_max_outstanding: int = 64
    llm_sticky: bool = True
    llm_registry: str | None = None
    """Name of the run's :class:`EndpointRegistry`; clients follow its routable set."""
    actor_max_restarts: int = 10
    """``run.actor_max_restarts``: how often Ray re-creates a dead agent actor."""
    agent_placement: str = "spread"
    """``run.agent_placement``: ``spread`` (a role's instances over the nodes) or ``pack``."""


@ray.remote(num_cpus=0, max_restarts=10, max_task_retries=-1)
class AgentActor:
    def __init__(self, team: TeamSpec, role: str, index: int) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.team = team
        self.role = role
        self.index = index
        self.incarnation = uuid.uuid4().hex
        spec = team.roles[role]
        self._clients: list[ChatClient] = []
        self.agent: Agent = self._make_agent(role)
        self._inline: dict[str, Agent] = {}  # agents of inline roles, built on first use
        self.concurrency = spec.concurrency
        self._handles: dict[str, list[Any]] = {}
        self._queue: asyncio.Queue[Task] | None = None
        self._running: dict[str, Task] = {}
        self._outbox: Outbox | None = None
        self.steps = 0

    def _make_agent(self, role: str) -> Agent:
        spec, team = self.team.roles[role], self.team
        cls = load_object(spec.agent)
        if not (isinstance(cls, type) and issubclass(cls, Agent)):
            raise TypeError(f"{spec.agent} is not a matrix_hpc.agents.Agent subclass")
        llm = None
        if cls.uses_llm:
            llm = ChatClient(
                team.llm_urls, team.llm_model, team.llm_api_key_env, team.llm_timeout_s,
                team.llm_max_retries, team.llm_retry_backoff_s, team.llm_max_connections,
                team.llm_max_outstanding, self._report_endpoint_error,
            )  # fmt: skip
            self._clients.append(llm)
        return cls(AgentContext(role, spec.params, llm, team.llm_max_tokens, team.llm_temperature, team.llm_sticky))

    def _registry(self) -> Any | None:
        if self.team.llm_registry is None:
            return None
        try:
            return ray.get_actor(self.team.llm_registry, namespace=self.team.namespace)
        except ValueError:
            return None

    def _report_endpoint_error(self, url: str) -> None:
        registry = self._registry()
        if registry is not None:
            registry.report_error.remote(url)  # fire and forget: the registry probes it now

    def _resolve(self, dest: str) -> list[Any]:
        if dest not in self._handles:
            ns = self.team.namespace
            if dest == SINK:
                self._handles[dest] = [ray.get_actor(sink_name(self.team.run_id), namespace=ns)]
            else:
                n = self.team.roles[dest].instances
                self._handles[dest] = [ray.get_actor(actor_name(self.team.run_id, dest, i), namespace=ns) for i in range(n)]
        return self._handles[dest]

    def _start(self) -> None:
        self._queue = asyncio.Queue()
        self._outbox = Outbox(self._resolve, self.team.batch_size, self.team.batch_wait_s)
        loop = asyncio.get_running_loop()
        registry = self._registry()
        if registry is not None:
            for client in self._clients:
                loop.create_task(follow_registry(client, registry))
        for _ in range(self.concurrency):
            loop.create_task(self._worker())

    async def receive(self, tasks: list[Task]) -> None:
        if self._queue is None:
            self._start()
        assert self._queue is not None
        for task in tasks:
            self._queue.put_nowait(task)

    async def _worker(self) -> None:
        assert self._queue is not None and self._outbox is not None
        while True:
            task = await self._queue.get()
            self._running[task.id] = task
            try:
                await self._step(task, self.agent, self.role)
                # Inline roles run here, saving a Ray hop each (see RoleConfig.inline).
                while not task.done and self.team.roles[task.next_role].inline:  # type: ignore[index]
                    role = task.next_role
                    assert role is not None
                    if role not in self._inline:
                        self._inline[role] = self.agent if role == self.role else self._make_agent(role)
                    await self._step(task, self._inline[role], role)
            finally:
                self._running.pop(task.id, None)
            if task.done:
                self._outbox.put(SINK, RecordRow.from_record(task.to_record()))
            else:
                self._outbox.put(task.next_role, task)

    async def _step(self, task: Task, agent: Agent, role: str) -> None:
        self.steps += 1
        await run_step(agent, task, role, self.team.roles)

    def ping(self) -> tuple[str, int, str]:
        """(incarnation, pid, host): a new incarnation means Ray restarted this actor."""
        return self.incarnation, os.getpid(), socket.gethostname()

    def held_ids(self) -> list[str]:
        ids = list(self._running)
        if self._queue is not None:
            ids.extend(t.id for t in self._queue._queue)  # type: ignore[attr-defined]
        if self._outbox is not None:
            ids.extend(self._outbox.held_ids())
        return ids
