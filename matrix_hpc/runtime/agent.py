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
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..config import PoolConfig, Sampling
from ..services.llm import ChatClient, ChatResult, LLMError, Message
from .task import Task, Turn

__all__ = ["MAX_HOPS", "Agent", "AgentContext", "run_step"]

log = logging.getLogger(__name__)

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

    @property
    def max_tokens(self) -> int:
        return self.sampling.max_tokens

    @property
    def temperature(self) -> float:
        return self.sampling.temperature


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
        """
        if self.ctx.llm is None:
            raise RuntimeError(f"role {self.role!r} has no LLM client (uses_llm is False, or it names no model)")
        # The role's sampling, then what this call says: a bare chat() is what the config says.
        request = {**self.ctx.sampling.request_fields(), **kwargs}
        model = self.ctx.model or self.ctx.llm.model  # the key in models; the served name for a bare client
        if self.ctx.sticky and "prefer" not in request:  # a task's earlier endpoint of this model
            request["prefer"] = next((t.endpoint for t in reversed(task.turns) if t.endpoint and t.model == model), None)
        started = time.time()
        try:
            res = await self.ctx.llm.chat(messages, **request)
        except LLMError as exc:  # recorded as a failed turn: errors are counted per model and role
            task.turns.append(Turn(role=self.role, text="", started_at=started, latency_s=time.time() - started, model=model,
                                   served_model=self.ctx.llm.model, max_tokens=request.get("max_tokens"), temperature=request.get("temperature"), error=exc.kind))  # fmt: skip
            raise
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
