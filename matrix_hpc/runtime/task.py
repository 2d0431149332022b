"""The task message that travels from agent to agent, and the record it ends as.

A :class:`Task` is a small state machine: ``next_role`` names the agent that
handles it next; ``None`` means finished (successfully, or with ``error`` set).
Assigning ``next_role`` (even to the current role) marks the task as routed, which
is how the runtime tells "routes to itself" from "forgot to route" (see ``run_step``).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, fields
from typing import Any

from ..store.token_trace import TokenTrace
from ..store.tokens import TokenUsage

__all__ = ["Task", "TaskError", "Turn", "content_id"]


def content_id(payload: bytes | str) -> str:
    """A stable id for a row that has none: a short hash of its content."""
    if isinstance(payload, str):
        payload = payload.encode()
    return "h" + hashlib.sha256(payload).hexdigest()[:20]


@dataclass(slots=True)
class Turn:
    """One agent step: who spoke, what, and what it cost."""

    role: str
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started_at: float = 0.0
    latency_s: float = 0.0
    endpoint: str | None = None
    """The endpoint that answered; None for a step that called no LLM (or a call that failed)."""
    model: str | None = None
    """The model called, by its key in ``models``; None for a step that called no LLM."""
    served_model: str | None = None
    """The model as the server named it in its reply."""
    max_tokens: int | None = None
    temperature: float | None = None
    """The sampling the call was sent with (see ``workflow.roles.NAME.sampling``)."""
    error: str | None = None
    """The error kind of a call that failed for good (the task then fails with it)."""
    replayed: bool = False
    """Answered from the call journal (paid for in an earlier life), not by the LLM."""
    tokens: TokenTrace | None = None
    """Prompt and completion token ids and logprobs, for a role that asks (``sampling.logprobs`` /
    ``sampling.return_token_ids``); packed arrays, not a number per token (see store.token_trace)."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Every field positionally: a tuple pickles and unpickles several times faster than
        # the slots dataclass's default state protocol, and a task carries all its turns at
        # every hop.
        return (Turn, tuple(getattr(self, n) for n in _TURN_FIELDS))

    @property
    def usage(self) -> TokenUsage:
        """This step's LLM call (a step that called no LLM counts its tokens, if any, as one call)."""
        return TokenUsage.of_call(self.prompt_tokens, self.completion_tokens, self.latency_s, self.error is not None)

    def as_dict(self) -> dict[str, Any]:
        """The turn as the record stores it (``dataclasses.asdict``, without its deep copy: every field but
        ``tokens`` is a scalar; ``tokens`` is base64 text, see :meth:`TokenTrace.to_dict`)."""
        d = {n: getattr(self, n) for n in _TURN_FIELDS}
        if self.tokens is not None:
            d["tokens"] = self.tokens.to_dict()
        return d


@dataclass(slots=True)
class TaskError:
    """Why a task ended without a result. ``kind`` is a short, countable category."""

    kind: str
    message: str
    role: str | None = None
    traceback: list[str] | None = None
    """For ``agent_error``: the innermost frames, ``file:line in function: code``."""

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "role": self.role, "traceback": list(self.traceback) if self.traceback is not None else None}


@dataclass(slots=True)
class Task:
    id: str
    row: dict[str, Any]
    next_role: str | None
    turns: list[Turn] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: TaskError | None = None
    attempt: int = 1
    created_at: float = field(default_factory=time.time)
    hops: int = 0
    llm_calls: int = 0
    """LLM calls started for this task in this attempt: the call sequence number that keys replay."""
    retry_of: dict[str, Any] | None = None
    """Set on a retry of a failed record (``run.retry_failed``): the row it replaces, its kind
    and how many records the id has; kept in the record (see :mod:`matrix_hpc.store.latest`)."""
    routed: bool = field(default=False, init=False, repr=False, compare=False)
    """Set by any assignment to ``next_role``; the runtime clears it before each step."""

    def __setattr__(self, name: str, value: Any) -> None:
        # A slots dataclass has no property hook on a field: intercept the assignment here.
        if name == "next_role":
            object.__setattr__(self, "routed", True)
        object.__setattr__(self, name, value)

    def __reduce__(self) -> tuple[Any, ...]:
        # The task crosses a Ray call at every hop: one flat tuple (``routed`` included) rather
        # than the slots dataclass's per-field state protocol, which ends in __setattr__ per field.
        values = [getattr(self, n) for n in _TASK_FIELDS]
        values[_TURNS_AT] = [tuple(getattr(t, n) for n in _TURN_FIELDS) for t in self.turns]  # fewer objects to pickle
        return (_restore_task, tuple(values))

    def fail(self, kind: str, message: str, role: str | None = None, traceback: list[str] | None = None) -> None:
        self.error = TaskError(kind, message, role, traceback)
        self.next_role = None

    def finish(self, result: dict[str, Any]) -> None:
        self.result = result
        self.next_role = None

    @property
    def done(self) -> bool:
        return self.next_role is None

    @property
    def usage(self) -> TokenUsage:
        """Every turn added up (steps that called no LLM included): the record's token totals."""
        return self.usage_split()[0]

    def usage_split(self) -> tuple[TokenUsage, dict[str, TokenUsage], dict[str, TokenUsage]]:
        """:attr:`usage`, and the LLM calls' tokens, calls, errors and latency per role and per model (one pass)."""
        total, by_role, by_model = TokenUsage(), {}, {}
        for t in self.turns:
            u = t.usage
            total += u
            if t.model is None and t.endpoint is None:  # a step that called no LLM
                continue
            for by, key in ((by_role, str(t.role or "unknown")), (by_model, str(t.model or "unknown"))):
                had = by.get(key)
                by[key] = u if had is None else had + u
        return total, by_role, by_model

    def to_record(self, finished_at: float | None = None) -> dict[str, Any]:
        """The JSON-able record the store keeps for this task."""
        # The record's totals are the token counts (the store's columns); per role and model, every counter.
        total, by_role, by_model = self.usage_split()
        usage = {
            **total.token_counts(),
            "by_role": {k: u.to_dict() for k, u in by_role.items()},
            "by_model": {k: u.to_dict() for k, u in by_model.items()},
        }
        record = {
            "id": self.id,
            "status": "failed" if self.error else "ok",
            "error": self.error.as_dict() if self.error else None,
            "row": self.row,
            "result": self.result,
            "turns": [t.as_dict() for t in self.turns],
            "usage": usage,
            "attempt": self.attempt,
            "hops": self.hops,
            "created_at": self.created_at,
            "finished_at": finished_at if finished_at is not None else time.time(),
        }
        if self.retry_of is not None:
            record["retry_of"] = self.retry_of
        return record


_TURN_FIELDS = tuple(f.name for f in fields(Turn))
_TASK_FIELDS = tuple(f.name for f in fields(Task))  # ``routed`` included (init=False)
_TURNS_AT = _TASK_FIELDS.index("turns")


def _restore_task(*values: Any) -> Task:
    """Unpickle a :class:`Task` (see ``Task.__reduce__``) without running ``__init__`` or ``__setattr__``."""
    task = object.__new__(Task)
    for name, value in zip(_TASK_FIELDS, values):
        object.__setattr__(task, name, value)
    object.__setattr__(task, "turns", [Turn(*t) for t in values[_TURNS_AT]])
    return task
