"""The task runtime: tasks, the agent base, actors and their outboxes, the team, source, sink and driver loop.

Workflow code imports `Agent` and `Task` from :mod:`matrix_hpc.agents` (the public API).

The names below are imported on first use: a module that needs one small part (``status``
reads ``runtime.usage``) does not pay for the agent base's LLM client and aiohttp (~1 s of CPU).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_getattr

if TYPE_CHECKING:
    from .agent import Agent, AgentContext
    from .task import Task, TaskError, Turn

__all__ = ["Agent", "AgentContext", "Task", "TaskError", "Turn"]

_HOME = {"Agent": ".agent", "AgentContext": ".agent", "Task": ".task", "TaskError": ".task", "Turn": ".task"}


__getattr__ = lazy_getattr(__name__, _HOME, globals())
