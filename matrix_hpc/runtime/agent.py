"""The base class of a workflow role.

An :class:`Agent` advances one task by one step. The runtime hosts many tasks per
agent concurrently and routes the task to ``task.next_role`` afterwards, so an
agent never talks to a coordinator: it only edits the task.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Container
from typing import Any, ClassVar

from ..services.llm import ChatClient, ChatResult, LLMError, Message
from .replay import Replay, call_digest
from .task import Task, Turn

__all__ = ["MAX_HOPS", "Agent", "AgentContext", "run_step"]

log = logging.getLogger(__name__)

MAX_HOPS = 1000  # a task still routed after this many steps is stuck in a loop


class AgentContext:
    """What the runtime hands an agent: its role name, settings and LLM access."""

    def __init__(
        self,
        role: str,
        params: dict[str, Any],
        llm: ChatClient | None,
        max_tokens: int,
        temperature: float,
        sticky: bool = True,
        replay: Replay | None = None,
    ) -> None:
        self.role = role
        self.params = params
        self.llm = llm
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.sticky = sticky
        """Prefer the endpoint that served the task's previous LLM turn (``llm.sticky``)."""
        self.replay = replay
        """The call journal (``run.replay``): completed calls are saved and replayed on resume."""


class Agent:
    """Subclass and implement :meth:`step`.

    ``step`` must leave the task either routed (``task.next_role = "other_role"``),
    finished (``task.finish(result)``) or failed (``task.fail(kind, message)``). An
    exception escaping ``step`` fails the task with kind ``agent_error``.
    """

    uses_llm: ClassVar[bool] = True

    def __init__(self, ctx: AgentContext) -> None:
        self.ctx = ctx
        self.role = ctx.role
        self.params = ctx.params

    async def step(self, task: Task) -> None:
        raise NotImplementedError

    async def chat(self, task: Task, messages: list[Message], **kwargs: Any) -> str:
        """Call the LLM and record the turn (text, usage, latency) on the task."""
        return (await self.chat_result(task, messages, **kwargs)).text

    async def chat_result(self, task: Task, messages: list[Message], **kwargs: Any) -> ChatResult:
        """Like :meth:`chat`, but returns the whole :class:`ChatResult` (``tool_calls`` included).

        The recorded turn's text is the reply's text, or its tool calls as JSON when it has no text.
        With a journal (``ctx.replay``), a call this task already completed in an earlier life
        is answered from it (the turn is marked ``replayed``, with the original usage and latency).
        """
        if self.ctx.llm is None:
            raise RuntimeError(f"role {self.role!r} has no LLM client (uses_llm is False)")
        kwargs.setdefault("max_tokens", self.ctx.max_tokens)
        kwargs.setdefault("temperature", self.ctx.temperature)
        if self.ctx.sticky:
            kwargs.setdefault("prefer", next((t.endpoint for t in reversed(task.turns) if t.endpoint), None))
        seq, task.llm_calls = task.llm_calls, task.llm_calls + 1
        replay, digest, hit = self.ctx.replay, "", None
        if replay is not None:
            sampling = {k: v for k, v in kwargs.items() if k != "prefer"}  # routing does not change the answer
            digest = call_digest(task.id, seq, self.ctx.llm.model, messages, sampling)
            hit = replay.lookup(digest)
        if hit is not None:
            res, started = hit
        else:
            started = time.time()
            res = await self.ctx.llm.chat(messages, **kwargs)
            if replay is not None:
                await replay.record(digest, task.id, res, started)  # durable before the task moves on
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
                model=res.model,
                replayed=hit is not None,
            )
        )
        return res


async def run_step(agent: Agent, task: Task, role: str, roles: Container[str]) -> None:
    """Advance ``task`` one step through ``agent``: the contract every scheduler keeps.

    An :class:`LLMError` or any exception from agent code fails this one task with a
    reason; a route to an unknown role, or past :data:`MAX_HOPS`, fails it as ``routing``.
    """
    task.hops += 1
    try:
        await agent.step(task)
    except LLMError as exc:
        task.fail(exc.kind, str(exc), role)
    except Exception as exc:  # agent code is user code: one task fails, the caller lives
        log.exception("task %s failed in role %s", task.id, role)
        task.fail("agent_error", f"{type(exc).__name__}: {exc}", role)
    if task.done:
        return
    if task.next_role not in roles:
        task.fail("routing", f"role {role!r} routed to unknown role {task.next_role!r}", role)
    elif task.hops >= MAX_HOPS:
        task.fail("routing", f"still routed after {MAX_HOPS} steps (last role {role!r})", role)
