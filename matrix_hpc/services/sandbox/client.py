"""Finding a node's pool and holding a lease from agent code.

    pool = get_or_create_pool("tool-sandboxes", {"size": 8})
    async with SandboxSession(pool, task_id="t1") as sb:
        await sb.write_file("db.json", data)
        res = await sb.exec("python3 tools.py db.json get_order '{}'")

Pools are named Ray actors, one per node and name (``<name>@<node id prefix>``),
created by whoever asks first (``get_if_exists``). They are detached, so a
killed agent does not take the pool (and every other task's sandbox) with it;
an idle pool exits by itself after ``sandbox.idle_exit_s``.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .base import ExecResult, SandboxLimits
from .config import PoolConfig, pool_config
from .pool import SandboxPool, holder_worker_id

__all__ = ["SandboxSession", "get_or_create_pool", "pool_actor_name"]

log = logging.getLogger(__name__)


def pool_actor_name(name: str, node_id: str | None = None) -> str:
    """The Ray actor name of pool ``name`` on ``node_id`` (default: this node)."""
    node_id = node_id or ray.get_runtime_context().get_node_id()
    return f"{name}@{node_id[:16]}"


def get_or_create_pool(name: str, config: PoolConfig | dict[str, Any] | None = None, per_node: bool = True) -> Any:
    """The handle of pool ``name`` on this node (or cluster-wide with ``per_node=False``), started if absent.

    ``config`` is validated here, so a bad key fails in the caller, not in the actor.
    """
    cfg = pool_config(config)
    opts: dict[str, Any] = {"get_if_exists": True, "lifetime": "detached"}
    if per_node:
        node_id = ray.get_runtime_context().get_node_id()
        opts["name"] = pool_actor_name(name, node_id)
        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
    else:
        opts["name"] = name
    return SandboxPool.options(**opts).remote(cfg, opts["name"])  # type: ignore[attr-defined]


class SandboxSession:
    """One lease, held for an ``async with`` block; released (recycled on an exception) at exit.

    Inside an actor the lease names that actor as its holder, so the pool takes the
    sandbox back if the actor dies or restarts while holding it.
    """

    def __init__(self, pool: Any, task_id: str, wait_s: float = 60.0, limits: SandboxLimits | None = None) -> None:
        self.pool = pool
        self.task_id = task_id
        self.wait_s = wait_s
        self.limits = limits
        self.lease: str | None = None
        self.execs = 0

    async def __aenter__(self) -> SandboxSession:
        ctx = ray.get_runtime_context()
        holder = ctx.current_actor if ctx.get_actor_id() else None
        worker = holder_worker_id() if holder is not None else None
        self.lease = await self.pool.acquire.remote(self.task_id, holder, worker, self.wait_s)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.lease is not None:
            lease, self.lease = self.lease, None
            try:
                await self.pool.release.remote(lease, exc_type is not None)
            except ray.exceptions.RayError as err:  # the pool is gone: nothing left to release
                log.warning("releasing sandbox lease of task %s failed: %s", self.task_id, err)

    def _held(self) -> str:
        if self.lease is None:
            raise RuntimeError("SandboxSession used outside its `async with` block")
        return self.lease

    async def exec(
        self, cmd: str | list[str], limits: SandboxLimits | None = None, stdin: bytes | None = None, env: dict[str, str] | None = None
    ) -> ExecResult:
        self.execs += 1
        result: ExecResult = await self.pool.exec.remote(self._held(), cmd, limits or self.limits, stdin, env)
        return result

    async def write_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        await self.pool.write_file.remote(self._held(), path, data.encode() if isinstance(data, str) else data, mode)

    async def read_file(self, path: str) -> bytes:
        data: bytes = await self.pool.read_file.remote(self._held(), path)
        return data
