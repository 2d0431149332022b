"""The task runtime: tasks, the agent base, actors and their outboxes, the team, source, sink and driver loop.

Workflow code imports `Agent` and `Task` from :mod:`matrix_hpc.agents` (the public API).

The names below are imported on first use: a module that needs one small part (``status``
reads ``runtime.usage``) does not pay for the agent base's LLM client and aiohttp (~1 s of CPU).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .agent import Agent, AgentContext
    from .task import Task, TaskError, Turn

__all__ = ["Agent", "AgentContext", "Task", "TaskError", "Turn"]

_HOME = {"Agent": ".agent", "AgentContext": ".agent", "Task": ".task", "TaskError": ".task", "Turn": ".task"}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value
