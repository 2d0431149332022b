"""Finding an awaitable a step left in a task: the trace of a forgotten ``await``.

``task.state["reply"] = self.chat(task, ...)`` stores a coroutine, not the reply. It
cannot be pickled, so the task failed at its next hop with Ray's serialization dump
(many lines, colour codes) and no hint of the cause; a coroutine never awaited also
makes Python warn when it is collected. :func:`take_awaitable` finds such a value in
``task.state`` or ``task.result`` before the task is sent, names where it is, and closes it.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

from .task import Task

__all__ = ["forgot_await", "take_awaitable"]

_SCALARS = (str, bytes, int, float, bool, type(None))
_MAX_DEPTH = 20  # deeper values are left to pickling: task state is meant to be plain and small
_MAX_ITEMS = 10_000  # a bound on the work per task, whatever its state holds


def _find(value: Any, path: str, depth: int, budget: list[int]) -> tuple[str, Any] | None:
    if isinstance(value, _SCALARS) or depth > _MAX_DEPTH or budget[0] <= 0:
        return None
    budget[0] -= 1
    if inspect.isawaitable(value):
        return path, value
    if isinstance(value, dict):
        items: Any = ((f"{path}[{k!r}]", v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    elif isinstance(value, (set, frozenset)):
        items = ((f"{path}{{...}}", v) for v in value)
    else:
        return None
    for sub, v in items:
        found = _find(v, sub, depth + 1, budget)
        if found is not None:
            return found
    return None


def _close(value: Any) -> None:
    """Close a coroutine (no "never awaited" warning later), cancel a future."""
    if inspect.iscoroutine(value):
        value.close()
    elif isinstance(value, asyncio.Future):
        value.cancel()
    elif callable(getattr(value, "close", None)):
        try:
            value.close()
        except Exception:  # best effort: the task fails either way
            pass


def _describe(value: Any) -> str:
    if inspect.iscoroutine(value):
        return f"an un-awaited coroutine ({value.__qualname__})"
    if isinstance(value, asyncio.Future):
        return f"an un-awaited {type(value).__name__}"
    return f"an un-awaited awaitable ({type(value).__name__})"


def forgot_await(task: Task, role: str) -> str | None:
    """The failure message when ``task.state`` or ``task.result`` holds an awaitable (which
    is closed); None when neither does."""
    for name in ("state", "result"):
        found = _find(getattr(task, name), f"task.{name}", 0, [_MAX_ITEMS])
        if found is not None:
            path, value = found
            _close(value)
            return f"role {role!r} left {_describe(value)} in {path}: did you forget `await`? (e.g. `reply = await self.chat(task, messages)`)"
    return None


def take_awaitable(task: Task, role: str) -> bool:
    """Fail ``task`` as ``bad_state`` if a step left an awaitable in it; True if it did."""
    message = forgot_await(task, role)
    if message is None:
        return False
    task.fail("bad_state", f"task {task.id}: {message}", role)
    task.state, task.result = {}, None  # what else the step left there may be as broken
    return True
