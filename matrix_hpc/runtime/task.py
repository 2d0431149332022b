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

    def __reduce__(self) -> tuple[Any, ...]:
        # Every field positionally: a tuple pickles and unpickles several times faster than
        # the slots dataclass's default state protocol, and a task carries all its turns at
        # every hop.
        return (Turn, tuple(getattr(self, n) for n in _TURN_FIELDS))

    def as_dict(self) -> dict[str, Any]:
        """The turn as the record stores it (``dataclasses.asdict``, without its deep copy: every field is a scalar)."""
        return {n: getattr(self, n) for n in _TURN_FIELDS}


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
    def usage(self) -> tuple[int, int]:
        return (
            sum(t.prompt_tokens for t in self.turns),
            sum(t.completion_tokens for t in self.turns),
        )

    def usage_by(self, attr: str) -> dict[str, dict[str, Any]]:
        """Tokens, calls, errors and latency per ``Turn.<attr>`` (``role`` or ``model``), LLM calls only."""
        out: dict[str, dict[str, Any]] = {}
        for t in self.turns:
            if t.model is None and t.endpoint is None:  # a step that called no LLM
                continue
            key = str(getattr(t, attr) or "unknown")
            acc = out.setdefault(key, {"prompt_tokens": 0, "completion_tokens": 0, "calls": 0, "errors": 0, "latency_s": 0.0})
            acc["prompt_tokens"] += t.prompt_tokens
            acc["completion_tokens"] += t.completion_tokens
            acc["calls"] += 1
            acc["errors"] += t.error is not None
            acc["latency_s"] += t.latency_s
        return out

    def to_record(self, finished_at: float | None = None) -> dict[str, Any]:
        """The JSON-able record the store keeps for this task."""
        prompt, completion = self.usage
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "by_role": self.usage_by("role"), "by_model": self.usage_by("model")}
        return {
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
