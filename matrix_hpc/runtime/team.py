"""A team: the sink and every role's actors of one run, created, watched and stopped together."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from ..labels import CPU_NODE, placement
from .actor import AgentActor, actor_name, load_object, sink_name
from .agent import Agent
from .health import ActorPing
from .sink import SinkActor
from .spec import TeamSpec
from .task import Task

__all__ = ["Team", "TeamError"]

log = logging.getLogger(__name__)


class TeamError(RuntimeError):
    """The team cannot be built or cannot go on (e.g. every actor of a role is dead)."""


class Team:
    def __init__(self, spec: TeamSpec, entry: str, store_path: str, chunk_rows: int, flush_interval_s: float, fsync: bool) -> None:
        for role, rs in spec.roles.items():  # fail here, with the key, not in a remote actor
            try:
                cls = load_object(rs.agent)
            except ImportError as exc:
                raise TeamError(f"workflow.roles.{role}.agent: {exc}") from None
            if not (isinstance(cls, type) and issubclass(cls, Agent)):
                raise TeamError(f"workflow.roles.{role}.agent: {rs.agent} is not a matrix_hpc.agents.Agent subclass")
            if cls.uses_llm and rs.model is None:
                raise TeamError(f"workflow.roles.{role}.model: the role calls an LLM; name one of the models ({', '.join(spec.models)})")
            if rs.inline and cls.uses_llm:
                raise TeamError(f"workflow.roles.{role}.inline: only roles that call no LLM (uses_llm = False) can run inline")
        self.spec = spec
        self.entry = entry
        agent_nodes = placement(CPU_NODE)  # agents on CPU nodes when the cluster labels them
        self.sink = SinkActor.options(name=sink_name(spec.run_id)).remote(store_path, chunk_rows, flush_interval_s, fsync, spec.metrics)
        self.actors: dict[str, list[Any]] = {
            role: [AgentActor.options(name=actor_name(spec.run_id, role, i), resources=agent_nodes).remote(spec, role, i) for i in range(rs.instances)]
            for role, rs in spec.roles.items()
        }
        self._rr = 0
        self.incarnations: dict[str, str] = {}
        self.pids: dict[str, int] = {}
        self.hosts: dict[str, str] = {}

    def _all(self) -> dict[str, Any]:
        named = {sink_name(self.spec.run_id): self.sink}
        for role, handles in self.actors.items():
            named.update({actor_name(self.spec.run_id, role, i): h for i, h in enumerate(handles)})
        return named

    async def start(self, timeout_s: float = 120.0, setup_timeout_s: float = 600.0) -> None:
        """Wait until every actor answers (surfacing constructor errors), then run every
        agent's ``setup()``; a failed one stops the run with the role's key."""
        names = list(self._all())
        try:
            replies = await asyncio.wait_for(asyncio.gather(*(h.ping.remote() for h in self._all().values())), timeout_s)
        except RayActorError as exc:
            raise TeamError(f"an actor failed to start: {exc}") from None
        for name, reply in zip(names, replies):
            self._note(name, reply)
        agents = [h for handles in self.actors.values() for h in handles]
        try:
            errors = await asyncio.wait_for(asyncio.gather(*(h.setup.remote() for h in agents)), setup_timeout_s)
        except asyncio.TimeoutError:
            raise TeamError(f"agents' setup() did not finish in {setup_timeout_s:.0f}s") from None
        failed = sorted({e for e in errors if e})
        if failed:
            raise TeamError(failed[0])

    def _note(self, name: str, reply: ActorPing) -> None:
        self.incarnations[name] = reply.incarnation
        self.pids[name], self.hosts[name] = reply.pid, reply.host
        for warning in reply.warnings:
            log.warning("%s", warning)

    async def close(self, timeout_s: float = 30.0) -> None:
        """Run every agent's ``close()`` (best effort: the run's results are committed)."""
        agents = [h for handles in self.actors.values() for h in handles]
        try:
            await asyncio.wait_for(asyncio.gather(*(h.close.remote() for h in agents), return_exceptions=True), timeout_s)
        except asyncio.TimeoutError:
            log.warning("agents' close() did not finish in %.0fs", timeout_s)

    async def check(self, timeout_s: float = 5.0) -> tuple[list[str], list[str]]:
        """(restarted, unreachable) actor names since the last check."""
        restarted, unreachable = [], []
        items = list(self._all().items())

        async def one(handle: Any) -> Any:
            return await asyncio.wait_for(handle.ping.remote(), timeout_s)

        replies = await asyncio.gather(*(one(h) for _, h in items), return_exceptions=True)
        dead_by_role: dict[str, int] = {}
        for (name, _), reply in zip(items, replies):
            if isinstance(reply, BaseException):
                unreachable.append(name)
                if isinstance(reply, RayActorError):
                    role = name.split("/")[-2]
                    dead_by_role[role] = dead_by_role.get(role, 0) + 1
                continue
            if self.incarnations.get(name) != reply.incarnation:
                restarted.append(name)
            self._note(name, reply)
        for role, n in dead_by_role.items():
            total = 1 if role == "__sink__" else len(self.actors[role])
            if n >= total:
                raise TeamError(f"every actor of role {role!r} is dead (restarts exhausted); see the Ray logs")
        return restarted, unreachable

    async def held_ids(self, timeout_s: float = 10.0) -> set[str]:
        """Ids some actor holds (queued, running, in an outbox, or pending commit)."""
        lists = await asyncio.wait_for(asyncio.gather(*(h.held_ids.remote() for h in self._all().values())), timeout_s)
        return {i for ids in lists for i in ids}

    async def replay_stats(self, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """Each agent actor's journal counters, after it flushed its journal (actors with replay off are left out)."""
        handles = [h for hs in self.actors.values() for h in hs]
        try:
            stats = await asyncio.wait_for(asyncio.gather(*(h.replay_stats.remote() for h in handles), return_exceptions=True), timeout_s)
        except asyncio.TimeoutError:
            return []
        return [s for s in stats if isinstance(s, dict)]

    async def dispatch(self, tasks: list[Task], batch_size: int) -> None:
        """Send new tasks to the entry role, round-robin in batches; returns once accepted."""
        handles = self.actors[self.entry]
        refs = []
        for lo in range(0, len(tasks), batch_size):
            refs.append(handles[self._rr % len(handles)].receive.remote(tasks[lo : lo + batch_size]))
            self._rr += 1
        if refs:
            await asyncio.gather(*refs)

    def shutdown(self) -> None:
        for handle in self._all().values():
            try:
                ray.kill(handle, no_restart=True)
            except (RayActorError, GetTimeoutError, ValueError):
                pass
