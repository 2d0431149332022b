"""Sandboxes for running untrusted commands: bubblewrap or Apptainer, pooled per node.

Entry points: :class:`SandboxPool` (the Ray actor), :func:`get_or_create_pool` and
:class:`SandboxSession` (what agents use), :class:`SandboxLimits` / :class:`ExecResult`.
"""

from .base import (
    ExecResult,
    LeaseNotFound,
    RuntimeNotInstalled,
    Sandbox,
    SandboxError,
    SandboxLimits,
    SandboxRuntime,
    SandboxStartError,
    SandboxUnavailable,
)
from .client import SandboxSession, get_or_create_pool, pool_actor_name
from .config import PoolConfig, SandboxConfigError, make_runtime, pool_config
from .pool import PoolStats, SandboxPool

__all__ = [
    "ExecResult",
    "LeaseNotFound",
    "PoolConfig",
    "PoolStats",
    "RuntimeNotInstalled",
    "Sandbox",
    "SandboxConfigError",
    "SandboxError",
    "SandboxLimits",
    "SandboxPool",
    "SandboxRuntime",
    "SandboxSession",
    "SandboxStartError",
    "SandboxUnavailable",
    "get_or_create_pool",
    "make_runtime",
    "pool_actor_name",
    "pool_config",
]
