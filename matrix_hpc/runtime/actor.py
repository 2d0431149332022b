"""The Ray actor that hosts one instance of a role.

It accepts task batches (``receive`` only enqueues), runs up to ``concurrency``
tasks at once through the role's :class:`Agent`, and hands each task straight to
an actor of its next role, or, once finished, to the sink, through a batching
:class:`Outbox`. Peers are found by name, so a restarted actor rejoins alone.
The agents' ``setup()`` runs before the first step (the team calls ``setup`` on
every actor before the first task; a restarted actor runs it on its own), their
``close()`` when the team closes. A restarted actor whose ``setup()`` fails takes no
task: it tells the driver why and leaves routing for good (its role's other
instances take its tasks), rather than fail every task sent to it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from typing import TYPE_CHECKING, Any

import ray

from .. import metrics
from ..credentials import read_secret
from ..store import RecordRow
from ..store.call_journal import CallJournal, JournalSegment
from .agent import Agent, AgentContext, errors_log, first_line, run_step, uses_llm
from .awaitables import take_awaitable
from .gcbudget import GcBudget
from .health import ActorPing, LoopLagWatcher
from .loader import load_object
from .outbox import Outbox
from .replay import Replay, ReplayStats
from .spec import ClientSpec, RoleSpec, TeamSpec
from .task import Task

if TYPE_CHECKING:
    from ..services.llm.client import ChatClient

__all__ = ["AgentActor", "RoleSpec", "TeamSpec", "actor_name", "load_object", "sink_name"]

log = logging.getLogger(__name__)

SINK = "__sink__"


def actor_name(run_id: str, role: str, index: int) -> str:
    return f"{run_id}/{role}/{index}"


def sink_name(run_id: str) -> str:
    return f"{run_id}/{SINK}"


def _log_agent_errors_to(path: str, who: str) -> None:
    """Send agent tracebacks to one file under the output (appends of whole lines from
    every actor), not to Ray's session folder under /tmp that the user never finds."""
    handler = logging.FileHandler(path, delay=True)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {who} pid {os.getpid()}: %(message)s"))
    errors_log.handlers[:] = [handler]
    errors_log.propagate = False


def _get_actor(name: str, namespace: str) -> Any | None:
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:  # not registered: dead for good (restarts exhausted)
        return None


@ray.remote(num_cpus=0, max_restarts=10, max_task_retries=-1)
class AgentActor:
    def __init__(self, team: TeamSpec, role: str, index: int) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if team.agents_log:
            _log_agent_errors_to(team.agents_log, f"{role}/{index}")
        self.team = team
        self.role = role
        self.index = index
        self.incarnation = uuid.uuid4().hex
        # Only inside a Ray actor (a unit test builds the class directly: Ray would assert).
        self._restarted = ray.is_initialized() and ray.get_runtime_context().was_current_actor_reconstructed
        self._leaving: str | None = None  # why this instance leaves routing (told to the driver by ping)
        self._told = asyncio.Event()  # the driver has read it
        metrics.configure(team.metrics, team.run_id)
        spec = team.roles[role]
        self._clients: dict[str, ChatClient] = {}
        """One client per model this actor's roles call (an inline role shares its model's)."""
        # One journal segment per incarnation (its lifecycle: store/call_journal.py).
        self._journal: JournalSegment | None = None
        self._replay: Replay | None = None
        if team.journal_dir is not None and spec.model is not None and uses_llm(self._agent_class(role)):
            self._journal = CallJournal(team.journal_dir, team.run_id, team.journal_fsync).open_segment(role, index, self.incarnation)
            self._replay = Replay(self._journal)
        self._queue: asyncio.Queue[Task | None] | None = None  # None: a worker's signal to end
        self.agent: Agent = self._make_agent(role)
        # Agents of inline roles, built (and set up) once on first use, however many workers ask at once.
        self._inline: dict[str, asyncio.Future[Agent]] = {}
        self._registries: dict[str, Any] = {}  # handles survive the registry's restarts
        self.concurrency = spec.concurrency
        self._handles: dict[str, list[Any]] = {}
        self._running: dict[str, Task] = {}
        self._outbox: Outbox | None = None
        self._ready: asyncio.Task[None] | None = None  # the agents' setup()
        self._setup_errors: dict[str, str] = {}  # role -> why its setup() failed
        self._loops: list[asyncio.Task[None]] = []
        self.lag = LoopLagWatcher(f"actor {role}/{index}", team.loop_lag_warn_s)
        self.gc = GcBudget()
        """Full garbage collections paced to 5% of the time: with many tasks in flight CPython's
        own pacing walks every live object every few seconds (see ``gcbudget``)."""
        self.steps = 0
        if team.metrics:
            metrics.add_collector(self._collect)

    def _held(self) -> int:
        return len(self._running) + (self._queue.qsize() if self._queue is not None else 0)

    def _collect(self) -> None:
        queued = self._queue.qsize() if self._queue is not None else 0
        metrics.set_gauge("tasks_in_flight", len(self._running) + queued, self.role)
        metrics.set_gauge("queue_depth", queued, self.role)

    def _agent_class(self, role: str) -> type[Agent]:
        agent = self.team.roles[role].agent
        cls = load_object(agent)
        if not (isinstance(cls, type) and issubclass(cls, Agent)):
            raise TypeError(f"{agent} is not a matrix_hpc.agents.Agent subclass")
        return cls

    def _make_agent(self, role: str) -> Agent:
        spec, team = self.team.roles[role], self.team
        cls = self._agent_class(role)
        llm = self._client(team.models[spec.model]) if uses_llm(cls) and spec.model is not None else None
        sticky = team.models[spec.model].sticky if spec.model is not None else True
        return cls(AgentContext(role, spec.params, llm, spec.sampling, sticky, team.sandbox, spec.model, self._replay))

    def _client(self, cs: ClientSpec) -> ChatClient:
        """The client of model ``cs`` in this actor: calls route over that model's endpoints only."""
        if cs.name not in self._clients:
            # Imported here: an actor whose roles call no LLM never loads the client and aiohttp.
            from ..services.llm.client import ChatClient

            own = self.team.roles[self.role]  # limits are per role: the actor's own (inline roles call no LLM)
            client = ChatClient(
                cs.urls, cs.served_name, cs.api_key_env, cs.timeout_s, cs.max_retries, cs.retry_backoff_s,
                own.max_connections, own.max_outstanding, lambda url, cs=cs: self._report_endpoint_error(cs, url),
                (self.role, cs.name) if self.team.metrics else None, read_secret(cs.api_key_file) if cs.api_key_file else None,
            )  # fmt: skip
            self._clients[cs.name] = client
            if self._queue is not None:  # built after start (a new inline role): follow its registry now
                self._follow(cs, client)
        return self._clients[cs.name]

    def _registry(self, cs: ClientSpec) -> Any | None:
        """The model's registry handle, looked up once: a lookup is a blocking GCS call, and
        endpoint errors come by the thousand when a replica dies under load."""
        if cs.registry is None:
            return None
        if cs.registry not in self._registries:
            try:
                self._registries[cs.registry] = ray.get_actor(cs.registry, namespace=self.team.namespace)
            except ValueError:
                return None
        return self._registries[cs.registry]

    def _report_endpoint_error(self, cs: ClientSpec, url: str) -> None:
        registry = self._registry(cs)
        if registry is not None:
            registry.report_error.remote(url)  # fire and forget: the registry probes it now

    def _follow(self, cs: ClientSpec, client: ChatClient) -> None:
        registry = self._registry(cs)
        if registry is not None:
            from ..services.llm.registry import follow_registry

            asyncio.get_running_loop().create_task(follow_registry(client, registry))

    def _resolve(self, dest: str) -> list[Any]:
        """Handles of ``dest``'s actors; None for one that is gone for good (its name
        is no longer registered), which the outbox then skips."""
        if dest not in self._handles:
            names = [sink_name(self.team.run_id)] if dest == SINK else [actor_name(self.team.run_id, dest, i) for i in range(self.team.roles[dest].instances)]
            self._handles[dest] = [_get_actor(name, self.team.namespace) for name in names]
        return self._handles[dest]

    def _unsendable(self, dest: str, message: Any, exc: Exception) -> None:
        """A task that cannot be serialized fails alone (``bad_state``); its batch goes on.
        Its record and the console get one line; Ray's report (many lines, with colour
        codes: what it found unpicklable, and where) goes to ``agents.log``."""
        if dest == SINK:  # a RecordRow is plain strings and numbers: this is a bug, say so loudly
            log.error("a record for %s cannot be sent to the sink: %s", self._id(message), exc)
            return
        task: Task = message
        errors_log.error("task %s cannot be sent to role %r (from role %r):\n%s: %s", task.id, dest, self.role, type(exc).__name__, exc)
        where = f"; the full report is in {self.team.agents_log}" if self.team.agents_log else ""
        task.fail("bad_state", f"task {task.id} cannot be sent to role {dest!r}: {type(exc).__name__}: {first_line(exc)}{where}", self.role)
        task.state, task.result = {}, None  # what made it unpicklable stays behind
        self._to_sink(task)

    @staticmethod
    def _id(message: Any) -> str:
        return str(getattr(message, "id", "?"))

    def _to_sink(self, task: Task) -> None:
        assert self._outbox is not None
        try:
            row = RecordRow.from_record(task.to_record())
        except Exception as exc:  # e.g. a result that JSON cannot encode even as text
            task.result, task.state = None, {}
            task.fail("bad_state", f"task {task.id}: its record cannot be encoded: {type(exc).__name__}: {exc}", self.role)
            row = RecordRow.from_record(task.to_record())
        metrics.inc("tasks_left_role", 1, self.role, row.status, row.error_kind or "")
        self._outbox.put(SINK, row)

    def _start(self) -> None:
        """Start the loop's work once, from the first remote call (setup or receive)."""
        if self._queue is not None:
            return
        self._queue = asyncio.Queue()
        self._outbox = Outbox(self._resolve, self.team.batch_size, self.team.batch_wait_s, load=self._held, on_unsendable=self._unsendable)
        loop = asyncio.get_running_loop()
        self._ready = loop.create_task(self._setup_all())
        for name, client in self._clients.items():
            self._follow(self.team.models[name], client)
        self._loops.append(loop.create_task(self.lag.run()))
        self._loops.append(loop.create_task(self.gc.run()))
        for _ in range(self.concurrency):
            self._loops.append(loop.create_task(self._worker()))
        if self._journal is not None:
            self._loops.append(loop.create_task(self._journal.compact_every(self.team.journal_compact_s, self._committed)))

    async def _setup_all(self) -> None:
        """This role's agent; on the entry's first instance, every inline role's too (built
        once, the agent its tasks then use): inline roles have no actor whose setup would
        stop the run at its start when theirs fails (``TeamSpec.sets_up_inline_roles``)."""
        await self._setup_agent(self.agent, self.role)
        if not self.team.sets_up_inline_roles(self.role, self.index):
            return
        for role in [r for r, rs in self.team.roles.items() if rs.inline and r != self.role]:
            built = self._inline[role] = asyncio.ensure_future(self._inline_agent(role))
            try:
                await asyncio.shield(built)
            except Exception as exc:  # its constructor (user code): the run stops with the role's key
                log.exception("building role %s failed", role)
                await self._setup_failed(role, f"workflow.roles.{role}: {type(exc).__name__}: {exc}")

    async def _setup_agent(self, agent: Agent, role: str) -> None:
        self.lag.started(f"setup() of role {role!r}")
        try:
            await agent.setup()
            return
        except Exception as exc:  # user code: report it with the role, do not kill the actor
            log.exception("setup() of role %s failed", role)
            why = f"workflow.roles.{role}: setup() failed: {type(exc).__name__}: {exc}"
        finally:
            self.lag.ended(f"setup() of role {role!r}")
        await self._setup_failed(role, why)

    async def _setup_failed(self, role: str, why: str) -> None:
        if not self._restarted:  # at the team's start: the run stops with this line
            self._setup_errors[role] = why
            return
        # A restarted actor: the run is under way and its peers can serve. Failing every
        # task sent here as agent_error would make good tasks permanent failures.
        await self._leave(f"{why} after a restart")

    async def _leave(self, why: str, tell_within_s: float = 10.0) -> None:
        """Leave routing for good, as an actor whose restarts are used up: Ray then fails
        every call to it with ``ActorDiedError``, so the driver, the outboxes and dispatch
        skip it and the driver re-sends what it held. Never returns (no worker starts)."""
        name = actor_name(self.team.run_id, self.role, self.index)
        log.error("%s: %s; this instance leaves routing, its role's other instances take its tasks", name, why)
        self._leaving = f"{name.split('/', 1)[-1]} leaves routing: {why}; its role's other instances take its tasks"
        try:  # the driver's next ping carries the reason (actors' logs do not reach its terminal)
            await asyncio.wait_for(self._told.wait(), tell_within_s)
        except TimeoutError:
            pass
        me = _get_actor(name, self.team.namespace)
        if me is not None:
            await asyncio.to_thread(ray.kill, me, no_restart=True)
        await asyncio.Event().wait()  # until the kill lands

    async def setup(self) -> str | None:
        """Run the agent's ``setup()`` now; returns the failure as one line, or None."""
        self._start()
        assert self._ready is not None
        await asyncio.shield(self._ready)
        return next(iter(self._setup_errors.values()), None)  # this role's first, then inline roles

    async def close(self) -> None:
        """Stop taking steps and run every agent's ``close()`` (the run is over)."""
        # Idle workers wait in the queue's list of getters; a cancelled one removes itself from
        # it with a linear scan, so cancelling them all is quadratic: with 50,000 workers per
        # actor close() took over 30 s. An end signal each wakes them in FIFO order instead.
        if self._queue is not None:
            for _ in range(self.concurrency):
                self._queue.put_nowait(None)
            await asyncio.sleep(0)  # the idle ones end here; busy ones are cancelled below
        for t in self._loops:
            t.cancel()
        built = [(r, f.result()) for r, f in self._inline.items() if f.done() and not f.cancelled() and f.exception() is None]
        for role, agent in [(self.role, self.agent), *((r, a) for r, a in built if a is not self.agent)]:
            try:
                await agent.close()
            except Exception:  # user code; the run's results are already committed
                log.exception("close() of role %s failed", role)
        if self._journal is not None:  # last: an agent's close() may still call; the journal's queued tail is flushed
            try:
                await self._journal.close()
            except Exception:  # its entries are fsynced in windows: at most the last window is lost
                log.exception("closing the call journal failed")

    async def _committed(self, ids: list[str]) -> list[str]:
        """Which of ``ids`` the sink has committed (the journal's compaction asks; one Ray call)."""
        return await self._resolve(SINK)[0].committed.remote(ids)

    async def replay_stats(self) -> ReplayStats | None:
        """Flush this incarnation's journal and return its counters (hits, writes, bytes,
        write time), or None when off. The driver calls it before a graceful shutdown."""
        if self._journal is None or self._replay is None:
            return None
        await self._journal.flush()
        return self._replay.stats()

    async def receive(self, tasks: list[Task]) -> None:
        self._start()
        assert self._queue is not None
        for task in tasks:
            self._queue.put_nowait(task)

    async def _worker(self) -> None:
        assert self._queue is not None and self._outbox is not None and self._ready is not None
        await asyncio.shield(self._ready)
        while True:
            task = await self._queue.get()
            if task is None:  # close()
                return
            self._running[task.id] = task
            role = self.role
            try:
                await self._step(task, self.agent, role)
                # Inline roles run here, saving a Ray hop each (see RoleConfig.inline).
                while not task.done and self.team.roles[task.next_role].inline:  # type: ignore[index]
                    role = task.next_role  # type: ignore[assignment]
                    if role not in self._inline:
                        self._inline[role] = asyncio.ensure_future(self._inline_agent(role))
                    await self._step(task, await asyncio.shield(self._inline[role]), role)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the runtime's own path failed (run_step catches agent code): one task fails, the worker lives
                log.exception("task %s: runtime error in role %s", task.id, role)
                task.fail("runtime_error", f"{type(exc).__name__}: {exc}", role)
            finally:
                self._running.pop(task.id, None)
            try:
                if task.error is None and take_awaitable(task, role):  # before pickling fails on it, less clearly
                    errors_log.error("%s", task.error.message)  # type: ignore[union-attr]
                if task.done:
                    self._to_sink(task)
                else:
                    self._outbox.put(task.next_role, task)  # type: ignore[arg-type]
            except Exception:  # never lose the worker; the driver's stall check re-sends the task
                log.exception("task %s could not be handed on", task.id)

    async def _inline_agent(self, role: str) -> Agent:
        if role == self.role:
            return self.agent
        agent = self._make_agent(role)
        await self._setup_agent(agent, role)
        return agent

    async def _step(self, task: Task, agent: Agent, role: str) -> None:
        self.steps += 1
        if role in self._setup_errors:  # this agent cannot serve; each task says why
            task.hops += 1
            task.fail("agent_error", self._setup_errors[role], role)
            return
        self.lag.started(f"role {role!r}")
        started = time.monotonic()
        try:
            await run_step(agent, task, role, self.team.roles)
        finally:
            self.lag.ended(f"role {role!r}")
        metrics.inc("steps", 1, role)
        metrics.observe("step_seconds", time.monotonic() - started, role)

    def ping(self) -> ActorPing:
        """Who this incarnation is; ``progress`` (steps taken) tells the driver whether tasks move."""
        warnings = self.lag.take_warnings()
        if self._leaving is not None and not self._told.is_set():
            warnings = (*warnings, self._leaving)
            self._told.set()
        calls = sum(sum(c.served.values()) for c in self._clients.values())
        tokens = sum(c.completion_tokens for c in self._clients.values())
        sends = self._outbox.sends if self._outbox is not None else 0
        return ActorPing(self.incarnation, os.getpid(), socket.gethostname(), warnings, self.steps, calls, tokens, sends)

    def held_ids(self) -> list[str]:
        ids = list(self._running)
        if self._queue is not None:
            ids.extend(t.id for t in self._queue._queue if t is not None)  # type: ignore[attr-defined]
        if self._outbox is not None:
            ids.extend(self._outbox.held_ids())
        return ids
