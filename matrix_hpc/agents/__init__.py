"""The peer-to-peer runtime: tasks, agents, the team of actors, source and sink."""

from .agent import Agent, AgentContext
from .task import Task, TaskError, Turn

__all__ = ["Agent", "AgentContext", "Task", "TaskError", "Turn"]
