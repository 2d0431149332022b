"""The public API for workflow authors: subclass :class:`Agent`, edit the :class:`Task`.

The runtime that hosts agents lives in :mod:`matrix_hpc.runtime`.
"""

from .runtime.agent import Agent, AgentContext
from .runtime.task import Task, TaskError, Turn

__all__ = ["Agent", "AgentContext", "Task", "TaskError", "Turn"]
