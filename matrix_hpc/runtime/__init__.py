"""The task runtime: tasks, the agent base, actors and their outboxes, the team, source, sink and driver loop.

Workflow code imports `Agent` and `Task` from :mod:`matrix_hpc.agents` (the public API)."""

from .agent import Agent, AgentContext
from .task import Task, TaskError, Turn

__all__ = ["Agent", "AgentContext", "Task", "TaskError", "Turn"]
