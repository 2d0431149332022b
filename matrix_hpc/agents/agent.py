"""The base class of a workflow role.

An :class:`Agent` advances one task by one step. The runtime hosts many tasks per
agent concurrently and routes the task to ``task.next_role`` afterwards, so an
agent never talks to a coordinator: it only edits the task.
"""

from __future__ import annotations

import json
import time
from typing import Any, ClassVar

from ..services.llm import ChatClient, ChatResult, Message
from .task import Task, Turn

__all__ = ["Agent", "AgentContext"]


class AgentContext:
    """What the runtime hands an agent: its role name, settings and LLM access."""

    def __init__(self, role: str, params: dict[str, Any], llm: ChatClient | None, max_tokens: int, temperature: float) -> None:
        self.role = role
        self.params = params
        self.llm = llm
        self.max_tokens = max_tokens
        self.temperature = temperature


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
            raise RuntimeError(f"role {self.role!r} has no LLM client (uses_llm is False)")
        kwargs.setdefault("max_tokens", self.ctx.max_tokens)
        kwargs.setdefault("temperature", self.ctx.temperature)
        started = time.time()
        res = await self.ctx.llm.chat(messages, **kwargs)
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
            )
        )
        return res
