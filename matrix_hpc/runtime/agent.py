"""The base class of a workflow role.

An :class:`Agent` advances one task by one step. The runtime hosts many tasks per
agent concurrently and routes the task to ``task.next_role`` afterwards, so an
agent never talks to a coordinator: it only edits the task.
"""

from __future__ import annotations

import json
import logging
import re
import time
import traceback
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from .. import metrics
from ..config import PoolConfig, Sampling
from ..config.schemas import reply_schema
from ..services.llm.chat_types import ChatResult, LLMError, Message
from ..store.textsafe import clean
from .params import build_params
from .replay import Replay, call_digest
from .replies import excerpt, parse_reply
from .task import Task, Turn
from .token_prefix import continued_prompt

if TYPE_CHECKING:  # the client (and aiohttp) only where a role calls an LLM: see AgentActor._client
    from ..services.llm.client import ChatClient

__all__ = ["MAX_HOPS", "Agent", "AgentContext", "errors_log", "first_line", "run_step", "uses_llm"]

log = logging.getLogger(__name__)
errors_log = logging.getLogger("matrix_hpc.agent_errors")
"""Full tracebacks of agent exceptions; the actor host points it at ``OUTPUT/logs/agents.log``."""

TRACEBACK_FRAMES = 5  # innermost frames kept in an agent_error record

MAX_HOPS = 1000  # a task still routed after this many steps is stuck in a loop


@dataclass
class AgentContext:
    """What the runtime hands an agent: its role name, settings, LLM access and sampling."""

    role: str
    params: dict[str, Any] = field(default_factory=dict)
    llm: ChatClient | None = None
    """The client of the role's model (``workflow.roles.NAME.model``); None for a role that calls no LLM."""
    sampling: Sampling = field(default_factory=Sampling)
    """What every call of this role sends unless the call says otherwise (``workflow.roles.NAME.sampling``)."""
    sticky: bool = True
    """Prefer the endpoint that served the task's previous LLM turn of the same model (``sticky``)."""
    sandbox: PoolConfig | None = None
    """The job's ``sandbox`` section, for roles that run tools."""
    model: str | None = None
    """The key in ``models`` of the role's model (what turns and accounting are labelled with)."""
    replay: Replay | None = None
    """The call journal (``run.replay``): completed calls are saved and replayed on resume."""

    @property
    def max_tokens(self) -> int:
        return self.sampling.max_tokens

    @property
    def temperature(self) -> float:
        return self.sampling.temperature


class Agent:
    """A workflow role: subclass it and implement :meth:`step`.

    **One instance serves many tasks at once.** An actor builds one agent per role and
    runs up to ``concurrency`` steps of different tasks concurrently on one asyncio
    loop, interleaved at every ``await``. Keep nothing about a task on ``self``
    (``self.last_answer = ...`` is overwritten by another task mid-step); per-task
    data goes in ``task.state``. ``self`` holds what every task shares: settings
    from ``self.params``, clients, caches, resources opened in :meth:`setup`.

    **The step contract.** ``step`` must leave the task routed (``task.next_role =
    "other_role"``; assigning the current role runs this role again), finished
    (``task.finish(result)``) or failed (``task.fail(kind, message)``). A step that
    does none of these fails the task as ``routing``: leaving ``next_role`` alone
    is a bug, not a loop. An exception escaping ``step`` fails the task as
    ``agent_error``; an :class:`LLMError` fails it with the error's kind.

    **task.state** travels with the task between actors and nodes (it is pickled
    at every hop): keep it to plain, small data (str, numbers, lists, dicts,
    dataclasses from an importable module), no handles, sockets or locks. It is
    saved in the record only through what you pass to ``task.finish`` (and the
    turns); an actor crash restarts the task from its row with an empty state.

    **Never block the event loop.** A blocking call (``time.sleep``, ``requests``,
    a heavy computation, a subprocess wait) stalls every task of the actor. Await
    async APIs, and run blocking work in a thread: ``await
    asyncio.to_thread(fn, *args)``. Each actor watches its loop and logs a warning
    naming the role when it stalls longer than ``run.loop_lag_warn_s``.

    **Per-actor resources.** :meth:`setup` runs once per actor before its first
    step (open a pool, load a model or an index); :meth:`close` runs once when the
    run ends. Both are async; a failing ``setup`` stops the run before any task.
    """

    uses_llm: ClassVar[bool] = True
    """Whether the role calls an LLM (it then names a model, gets a client and a call journal,
    and cannot run inline). Read it through :func:`uses_llm`, the one place that decides."""

    Params: ClassVar[type | None] = None
    """A dataclass of the params this agent takes, with their types and defaults. Declared, the
    role's ``params`` are checked when the run starts, before Ray (a key it does not declare is
    a config error with a "did you mean"), and ``self.params`` is an instance of it; undeclared,
    ``self.params`` is the dict as written, unchecked."""

    def __init__(self, ctx: AgentContext) -> None:
        self.ctx = ctx
        self.role = ctx.role
        self.params: Any = build_params(type(self), ctx.params, f"workflow.roles.{ctx.role}.params")

    async def setup(self) -> None:
        """Open per-actor resources; called once per actor before its first step."""

    async def close(self) -> None:
        """Release what :meth:`setup` opened; called once when the run ends."""

    async def step(self, task: Task) -> None:
        raise NotImplementedError

    async def chat(self, task: Task, messages: list[Message], **kwargs: Any) -> str:
        """Call the LLM and record the turn (text, usage, latency) on the task."""
        return (await self.chat_result(task, messages, **kwargs)).text

    async def chat_json(self, task: Task, messages: list[Message], schema: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """Call the LLM (as :meth:`chat`) and return the JSON value of its reply: the whole reply,
        else its first fenced ```json block, else the first ``{...}`` object in it.

        It is checked against ``schema``, by default the role's ``sampling.response_format``
        (which also makes the engine answer in JSON). A reply with no JSON raises
        :class:`LLMError` ``bad_reply``, one that does not match ``schema``: ``schema``; either
        fails the task (naming the role, the call and the start of the reply) unless caught.
        """
        text = await self.chat(task, messages, **kwargs)
        if schema is None:
            schema = reply_schema(kwargs.get("response_format", self.ctx.sampling.request_fields().get("response_format")))
        value, kind, problem = parse_reply(text, schema)
        if kind is not None:
            raise LLMError(kind, f"role {self.role!r}, LLM call {task.llm_calls}: reply {problem}: {excerpt(text)}")
        return value

    async def chat_result(self, task: Task, messages: list[Message], **kwargs: Any) -> ChatResult:
        """Like :meth:`chat`, but returns the whole :class:`ChatResult` (``tool_calls`` included).

        The recorded turn's text is the reply's text, or its tool calls as JSON when it has no text.
        With a journal (``ctx.replay``), a call this task already completed in an earlier life
        is answered from it (the turn is marked ``replayed``, with the original usage and latency).

        With a ``response_format`` (the role's ``sampling.response_format``, or this call's), each
        reply is checked against its schema; one that does not match is asked again, up to the
        model's ``max_retries`` (its turn kept with error ``schema``), then :class:`LLMError`
        ``schema`` names the first mismatch.
        """
        schema = reply_schema(kwargs.get("response_format", self.ctx.sampling.request_fields().get("response_format")))
        attempts = 1 + (getattr(self.ctx.llm, "max_retries", 0) if schema is not None else 0)
        for attempt in range(1, attempts + 1):
            res = await self._chat_once(task, messages, **kwargs)
            if schema is None:
                return res
            _, kind, problem = parse_reply(res.text, schema)
            if kind is None:
                return res
            task.turns[-1].error = "schema"  # kept (it was paid for), left out of the messages view
            cut = f" (cut at max_tokens={task.turns[-1].max_tokens})" if res.finish_reason == "length" else ""
            log.debug("role %s, task %s: reply %d of %d %s%s", self.role, task.id, attempt, attempts, problem, cut)
        last = f"the last reply {problem}{cut}: {excerpt(res.text)}"
        raise LLMError("schema", f"role {self.role!r}: {attempts} replies in a row did not match sampling.response_format; {last}")

    async def _chat_once(self, task: Task, messages: list[Message], **kwargs: Any) -> ChatResult:
        """One LLM call, recorded as one turn (see :meth:`chat_result`)."""
        if self.ctx.llm is None:
            raise RuntimeError(f"role {self.role!r} has no LLM client (uses_llm is False, or it names no model)")
        # The role's sampling, then what this call says: a bare chat() is what the config says.
        request = {**self.ctx.sampling.request_fields(), **kwargs}
        # Text UTF-8 cannot encode (a row's invalid bytes, a lone surrogate in a reply) goes out
        # replaced, as the record replaces it (store.textsafe): a server refuses it (HTTP 400).
        messages = clean(messages)[0]
        model = self.ctx.model or self.ctx.llm.model  # the key in models; the served name for a bare client
        if self.ctx.sticky and "prefer" not in request:  # a task's earlier endpoint of this model
            request["prefer"] = next((t.endpoint for t in reversed(task.turns) if t.endpoint and t.model == model), None)
        seq, task.llm_calls = task.llm_calls, task.llm_calls + 1
        replay, digest, hit = self.ctx.replay, "", None
        if replay is not None:
            sampling = {k: v for k, v in request.items() if k != "prefer"}  # routing does not change the answer
            digest = call_digest(task.id, seq, f"{model}/{self.ctx.llm.model}", messages, sampling)
            hit = replay.lookup(digest)
        if hit is not None:
            res, started = hit
            metrics.inc("replayed_calls", 1, self.role, model)
        else:
            started = time.time()
            if request.get("return_token_ids"):  # the previous turn's ids, continued exactly (vLLM; see token_prefix)
                ids = await continued_prompt(self.ctx.llm, messages, task.turns, model)
                if ids is not None:
                    request["kv_transfer_params"] = {"prompt_token_ids": ids}
            try:
                res = await self.ctx.llm.chat(messages, **request)
            except LLMError as exc:  # recorded as a failed turn: errors are counted per model and role
                task.turns.append(Turn(role=self.role, text="", started_at=started, latency_s=time.time() - started, model=model,
                                       served_model=self.ctx.llm.model, max_tokens=request.get("max_tokens"), temperature=request.get("temperature"), error=exc.kind))  # fmt: skip
                raise
            if replay is not None:
                replay.record(digest, task.id, res, started)  # batched: the task does not wait for the fsync
        text = res.text or (json.dumps([c.get("function", c) for c in res.tool_calls], ensure_ascii=False) if res.tool_calls else "")
        task.turns.append(
            Turn(
                role=self.role,
                text=text,
                prompt_tokens=res.prompt_tokens,
                completion_tokens=res.completion_tokens,
                started_at=started,
                latency_s=res.latency_s,
                endpoint=res.endpoint,
                model=model,
                served_model=res.model,
                max_tokens=request.get("max_tokens"),
                temperature=request.get("temperature"),
                replayed=hit is not None,
                tokens=res.tokens,
            )
        )
        return res


def uses_llm(agent: object) -> bool:
    """Whether agent class ``agent`` calls an LLM: its ``uses_llm``, and True when it has none
    (the :class:`Agent` base's default: a subclass that does not say calls one; a class that is
    not an Agent is refused by the config check and the actor anyway). The one place this is
    decided: the config check (the role names a model; only a role that calls none runs
    inline), the team spec (limits counted in LLM requests or in tasks) and the agent actor
    (an LLM client and a call journal)."""
    return bool(getattr(agent, "uses_llm", True))


def frames(exc: BaseException, n: int = TRACEBACK_FRAMES) -> list[str]:
    """The innermost ``n`` frames of ``exc``'s traceback, one line each."""
    return [
        f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}" for f in traceback.extract_tb(exc.__traceback__.tb_next)[-n:]
    ]  # tb_next: not run_step itself


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of ``exc``'s message, without terminal colour codes, cut to ``limit``
    characters: what a record's message and the console get (Ray's serialization errors
    run to dozens of coloured lines)."""
    text = _ANSI.sub("", str(exc)).strip()
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _did_you_mean(name: object, roles: Container[str]) -> str:
    """`` (did you mean 'critic'?)`` for a misspelt role, else the roles there are."""
    import difflib  # here: an actor imports it only for a misspelt role

    known = sorted(roles) if isinstance(roles, Iterable) else []
    close = difflib.get_close_matches(str(name), known, n=1) if isinstance(name, str) else []
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (roles: {', '.join(known)})" if known else ""


async def run_step(agent: Agent, task: Task, role: str, roles: Container[str]) -> None:
    """Advance ``task`` one step through ``agent``: the contract every scheduler keeps.

    An :class:`LLMError` or any exception from agent code fails this one task with a
    reason; a step that leaves the task unrouted (``next_role`` never assigned), a
    route to an unknown role, or one past :data:`MAX_HOPS` fails it as ``routing``.
    """
    task.hops += 1
    task.routed = False
    try:
        await agent.step(task)
    except LLMError as exc:
        task.fail(exc.kind, str(exc), role)
    except Exception as exc:  # agent code is user code: one task fails, the caller lives
        errors_log.exception("task %s failed in role %s", task.id, role)
        task.fail("agent_error", f"{type(exc).__name__}: {exc}", role, traceback=frames(exc))
    if task.done:
        return
    if not task.routed:  # without this check the task would loop back into this role forever
        task.fail("routing", f"role {role!r} neither routed, finished nor failed the task (set task.next_role, or call task.finish() or task.fail())", role)
    elif task.next_role not in roles:
        task.fail("routing", f"role {role!r} routed to unknown role {task.next_role!r}{_did_you_mean(task.next_role, roles)}", role)
    elif task.hops >= MAX_HOPS:
        task.fail("routing", f"still routed after {MAX_HOPS} steps (last role {role!r})", role)
