"""A team: the sink and every role's actors of one run, created, watched and stopped together."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any

import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError

from ..labels import CPU_NODE, on_driver_node, placement
from ..store.record_row import WriterOwner
from .actor import AgentActor, actor_name, load_object, sink_name
from .health import ActorPing
from .loader import role_problem
from .replay import ReplayStats
from .sink import SinkActor
from .spec import TeamSpec
from .task import Task

__all__ = ["Team", "TeamError"]

log = logging.getLogger(__name__)


class TeamError(RuntimeError):
    """The team cannot be built or cannot go on (e.g. every actor of a role is dead)."""


_GONE = "restarts used up, or setup() failed after a restart"
DISPATCH_WAIT_S = 2.0
"""How long :meth:`Team.dispatch` waits for the entry actors to accept a batch before the driver goes on."""


def _role_of(name: str) -> str:
    return name.split("/")[-2]


class Team:
    """The sink and the roles' actors. An actor whose restarts are used up is *dead*:
    it is left out of dispatch, recovery and health checks, and its role's other
    instances take its work; a role (or the sink) with no live actor left is a
    :class:`TeamError`."""

    def __init__(
        self, spec: TeamSpec, entry: str, store_path: str, chunk_rows: int, flush_interval_s: float, fsync: bool,
        max_restarts: int = 10, commit_retry_s: float = 300.0, owner: WriterOwner | None = None,
    ) -> None:  # fmt: skip
        for role, rs in spec.roles.items():  # fail here, with the key, not in a remote actor
            try:
                cls = load_object(rs.agent)
            except ImportError as exc:
                raise TeamError(f"workflow.roles.{role}.agent: {exc}") from None
            problem = role_problem(role, cls, rs.agent, rs.model is not None, rs.inline, spec.models)
            if problem:
                raise TeamError(problem)
        if spec.entry != entry:
            spec = replace(spec, entry=entry)
        self.spec = spec
        self.entry = entry
        # Agents on CPU nodes when the cluster labels them, spread or packed; Ray re-creates a
        # dead one (on a surviving node) up to max_restarts times. The sink stays with the driver.
        agent_opts: dict[str, Any] = {"resources": placement(CPU_NODE), "max_restarts": max_restarts}
        if spec.agent_placement == "spread":
            agent_opts["scheduling_strategy"] = "SPREAD"
        self.sink = SinkActor.options(name=sink_name(spec.run_id), max_restarts=max_restarts, **on_driver_node()).remote(
            store_path, chunk_rows, flush_interval_s, fsync, spec.metrics, commit_retry_s, owner
        )
        # An inline role gets no actor (it runs in the actors that hand it a task), unless it is the entry.
        self.actors: dict[str, list[Any]] = {
            role: [AgentActor.options(name=actor_name(spec.run_id, role, i), **agent_opts).remote(spec, role, i) for i in range(rs.instances)]
            for role, rs in spec.roles.items()
            if spec.has_actors(role)
        }
        self._rr = 0
        self.incarnations: dict[str, str] = {}
        self.pids: dict[str, int] = {}
        self.hosts: dict[str, str] = {}
        self.steps: dict[str, int] = {}
        """Steps taken (agents) or rows committed (sink) at the last check: a stall check's clock."""
        self._counts: dict[str, tuple[int, int, int]] = {}
        """(LLM calls, output tokens, outbox Ray calls) per actor at the last check, earlier
        incarnations' included."""
        self._counts_before: dict[str, tuple[int, int, int]] = {}
        """What earlier incarnations of each actor had counted (a restarted actor counts from 0)."""
        self._sending: dict[asyncio.Future[Any], tuple[str, list[Task]]] = {}
        """Entry batches the driver sent that their actor has not accepted yet (held by the driver)."""
        self.dead: set[str] = set()
        """Actors gone for good (Ray's restarts used up, or one that left routing: its setup() failed after a restart)."""

    def _all(self) -> dict[str, Any]:
        named = {sink_name(self.spec.run_id): self.sink}
        for role, handles in self.actors.items():
            named.update({actor_name(self.spec.run_id, role, i): h for i, h in enumerate(handles)})
        return named

    def _live(self) -> dict[str, Any]:
        return {n: h for n, h in self._all().items() if n not in self.dead}

    async def start(self, timeout_s: float = 120.0, setup_timeout_s: float = 600.0) -> None:
        """Wait until every actor answers (surfacing constructor errors), then run every
        agent's ``setup()``; a failed one stops the run with the role's key."""
        names = list(self._all())
        try:
            replies = await asyncio.wait_for(asyncio.gather(*(h.ping.remote() for h in self._all().values())), timeout_s)
        except RayActorError as exc:
            raise TeamError(f"an actor failed to start: {exc}") from None
        except TimeoutError:
            raise TeamError(f"the run's actors did not all answer within {timeout_s:.0f}s of their start (too few CPUs for them?)") from None
        for name, reply in zip(names, replies):
            self._note(name, reply)
        agents = [h for handles in self.actors.values() for h in handles]
        try:
            errors = await asyncio.wait_for(asyncio.gather(*(h.setup.remote() for h in agents)), setup_timeout_s)
        except TimeoutError:
            raise TeamError(f"agents' setup() did not finish in {setup_timeout_s:.0f}s") from None
        failed = sorted({e for e in errors if e})
        if failed:
            raise TeamError(failed[0])

    def _note(self, name: str, reply: ActorPing) -> None:
        if self.incarnations.get(name, reply.incarnation) != reply.incarnation:  # restarted: it counts from 0 again
            self._counts_before[name] = self._counts.get(name, (0, 0, 0))
        calls, tokens, sends = self._counts_before.get(name, (0, 0, 0))
        self._counts[name] = (calls + reply.llm_calls, tokens + reply.llm_tokens, sends + reply.ray_calls)
        self.incarnations[name] = reply.incarnation
        self.pids[name], self.hosts[name], self.steps[name] = reply.pid, reply.host, reply.progress
        for warning in reply.warnings:
            log.warning("%s", warning)

    def ray_calls(self) -> int:
        """Batches the agents' outboxes have sent so far (one Ray call each), as of the last check."""
        return sum(sends for _, _, sends in self._counts.values())

    def llm_activity(self) -> dict[str, tuple[int, int]]:
        """(LLM calls, output tokens) per role so far, as of the last check (finished tasks' and
        those still in flight, dead actors' included)."""
        out: dict[str, tuple[int, int]] = {}
        for name, (calls, tokens, _) in self._counts.items():
            if calls:
                c, t = out.get(_role_of(name), (0, 0))
                out[_role_of(name)] = (c + calls, t + tokens)
        return out

    def _mark_dead(self, name: str) -> None:
        if name in self.dead:
            return
        self.dead.add(name)
        log.warning("actor %s is gone for good (restarts used up, or it left routing); its role's other instances take its tasks", name)
        if name == sink_name(self.spec.run_id):
            raise TeamError("the sink is dead (restarts used up); committed work is kept, re-run to resume")
        role = _role_of(name)
        if all(actor_name(self.spec.run_id, role, i) in self.dead for i in range(len(self.actors[role]))):
            raise TeamError(f"role {role!r} has no live instance left ({_GONE}); committed work is kept, re-run to resume")

    async def close(self, timeout_s: float = 30.0) -> None:
        """Run every agent's ``close()`` (best effort: the run's results are committed)."""
        agents = [h for name, h in self._live().items() if h is not self.sink]
        try:
            await asyncio.wait_for(asyncio.gather(*(h.close.remote() for h in agents), return_exceptions=True), timeout_s)
        except TimeoutError:
            log.warning("agents' close() did not finish in %.0fs", timeout_s)

    async def check(self, timeout_s: float = 5.0) -> tuple[list[str], list[str]]:
        """(restarted, unreachable) actor names since the last check; raises
        :class:`TeamError` once a role (or the sink) has no live actor left."""
        restarted, unreachable = [], []
        items = list(self._live().items())

        async def one(handle: Any) -> Any:
            return await asyncio.wait_for(handle.ping.remote(), timeout_s)

        replies = await asyncio.gather(*(one(h) for _, h in items), return_exceptions=True)
        for (name, _), reply in zip(items, replies):
            if isinstance(reply, BaseException):
                unreachable.append(name)
                if isinstance(reply, ActorDiedError):
                    self._mark_dead(name)
                continue
            if self.incarnations.get(name) != reply.incarnation:
                restarted.append(name)
            self._note(name, reply)
        return restarted, unreachable

    async def held_by(self, timeout_s: float = 10.0, silent: list[str] | None = None) -> dict[str, list[str]]:
        """Ids each live actor holds (queued, running, in an outbox, or pending commit), and
        the driver's entry batches not yet accepted. An actor found dead for good holds
        nothing; one that does not answer in time raises (it may be restarting: ask again
        later), or, given a ``silent`` list, is named there instead."""
        items = list(self._live().items())

        async def one(handle: Any) -> Any:
            return await asyncio.wait_for(handle.held_ids.remote(), timeout_s)

        replies = await asyncio.gather(*(one(h) for _, h in items), return_exceptions=True)
        out: dict[str, list[str]] = {}
        for name, batch in self._sending.values():  # sent by the driver, not yet accepted: the driver holds them
            out.setdefault(f"{self.spec.run_id}/driver (sending to {name.split('/', 1)[-1]})", []).extend(t.id for t in batch)
        for (name, _), reply in zip(items, replies):
            if isinstance(reply, ActorDiedError):
                self._mark_dead(name)
            elif isinstance(reply, BaseException):
                if silent is None or not isinstance(reply, (asyncio.TimeoutError, RayActorError)):
                    raise reply
                silent.append(name)
            else:
                out[name] = reply
        return out

    async def held_ids(self, timeout_s: float = 10.0) -> set[str]:
        """Ids some actor holds (queued, running, in an outbox, or pending commit)."""
        return {i for ids in (await self.held_by(timeout_s)).values() for i in ids}

    async def replay_stats(self, timeout_s: float = 10.0) -> list[ReplayStats]:
        """Each agent actor's journal counters, after it flushed its journal (actors with replay off are left out)."""
        handles = [h for hs in self.actors.values() for h in hs]
        try:
            stats = await asyncio.wait_for(asyncio.gather(*(h.replay_stats.remote() for h in handles), return_exceptions=True), timeout_s)
        except TimeoutError:
            return []
        return [s for s in stats if isinstance(s, ReplayStats)]

    async def dispatch(self, tasks: list[Task], batch_size: int, wait_s: float = DISPATCH_WAIT_S) -> None:
        """Send new tasks to the entry role's live actors, round-robin in batches, and wait
        up to ``wait_s`` for them to be accepted. A batch refused by a dead actor goes to
        another; one not accepted in time (its actor frozen, or restarting where Ray cannot
        place it) stays held by the driver (see :meth:`held_by`) and is settled by a later
        call: the driver's loop never waits on an actor without a bound."""
        waiting = self._send([tasks[lo : lo + batch_size] for lo in range(0, len(tasks), batch_size)])
        deadline = time.monotonic() + wait_s
        while True:
            left = deadline - time.monotonic()
            if waiting and left > 0:
                await asyncio.wait(waiting, timeout=left)
            waiting = self._settle()  # a batch a dead actor refused went to another: wait for it too
            if not waiting or time.monotonic() >= deadline:
                return

    def _send(self, batches: list[list[Task]]) -> list[asyncio.Future[Any]]:
        if not batches:
            return []
        names = [actor_name(self.spec.run_id, self.entry, i) for i in range(len(self.actors[self.entry]))]
        live = [(n, h) for n, h in zip(names, self.actors[self.entry]) if n not in self.dead]
        if not live:
            raise TeamError(f"role {self.entry!r} has no live instance left ({_GONE}); committed work is kept, re-run to resume")
        sent = []
        for batch in batches:
            name, handle = live[self._rr % len(live)]
            self._rr += 1
            fut = asyncio.ensure_future(handle.receive.remote(batch))
            self._sending[fut] = (name, batch)
            sent.append(fut)
        return sent

    def _settle(self) -> list[asyncio.Future[Any]]:
        """Take the answers of the entry batches in flight; re-send what dead actors refused."""
        again = []
        for fut in [f for f in self._sending if f.done()]:
            name, batch = self._sending.pop(fut)
            exc = fut.exception()
            if isinstance(exc, ActorDiedError):
                self._mark_dead(name)
                again.append(batch)
            elif exc is not None:
                raise exc
        return self._send(again)

    def stop_agents(self) -> None:
        """Kill the agent actors (first, so nothing reaches the sink after it closes)."""
        for handle in self._all().values():
            if handle is not self.sink:
                _kill(handle)

    def shutdown(self) -> None:
        self.stop_agents()
        _kill(self.sink)


def _kill(handle: Any) -> None:
    try:
        ray.kill(handle, no_restart=True)
    except (RayActorError, GetTimeoutError, ValueError):
        pass
