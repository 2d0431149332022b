"""The per-node sandbox pool: a Ray actor that keeps N warm sandboxes and leases them out.

Contract: ``acquire`` returns a lease id or raises :class:`SandboxUnavailable` once
its wait limit passes (waiters are served first come, first served, without
polling); ``exec`` runs a command in the leased sandbox; ``release`` hands it back
(reset as new, or destroyed and replaced after ``max_uses`` or a failure). A lease whose
holder actor died (or was restarted) is reclaimed within ``liveness_interval_s``;
a lease older than ``lease_ttl_s`` is reclaimed whatever its holder.

Between two leases a sandbox keeps nothing of the first: :meth:`Sandbox.reset` deletes
every file the lease wrote and verifies that no process it started still runs; a sandbox
that cannot be reset in place (an Apptainer instance) is replaced instead. Private
directories live per user and per pool (see :mod:`._dirs`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from ... import metrics
from ._dirs import PoolDir, default_root
from .apptainer import ApptainerRuntime
from .base import ExecResult, LeaseNotFound, Sandbox, SandboxError, SandboxLimits, SandboxRuntime, SandboxUnavailable
from .config import PoolConfig, make_runtime, pool_config

__all__ = ["PoolStats", "SandboxPool", "holder_worker_id"]

log = logging.getLogger(__name__)

_TAINTING = {"wall", "output", "cancelled"}  # kills that may leave processes or half-written state
_RETRY_START_S = 5.0
_PING_TIMEOUT_S = 5.0


def holder_worker_id(actor_self: Any = None) -> str:
    """The Ray worker id of the calling process; changes when an actor is restarted."""
    return ray.get_runtime_context().get_worker_id()


@dataclass
class PoolStats:
    name: str
    runtime: str
    size: int
    free: int
    leased: int
    recycling: int
    waiting: int
    execs: int
    recycled: int
    reclaimed: int
    broken: int  # slots whose sandbox could not be restarted (retried every few seconds)


@dataclass
class _Lease:
    id: str
    task_id: str
    sandbox: Sandbox
    holder: Any | None  # the holder's actor handle
    holder_worker: str | None
    acquired_at: float = field(default_factory=time.monotonic)
    inflight: set[asyncio.Future[ExecResult]] = field(default_factory=set)


@ray.remote(num_cpus=0, max_concurrency=10_000)  # type: ignore[call-overload]
class SandboxPool:
    """``SandboxPool.remote(config, name)``: start-up happens on the first call (or ``ready()``).

    An async actor with no CPU reserved: it only waits on subprocesses, and one
    actor serves thousands of concurrent calls from its event loop.
    """

    def __init__(self, config: PoolConfig | dict[str, Any] | None = None, name: str = "sandbox-pool") -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.cfg = pool_config(config)
        self.name = name
        self.runtime: SandboxRuntime | None = None
        self.dir: Path | None = None
        self._dir: PoolDir | None = None
        self._free: collections.deque[Sandbox] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[Sandbox]] = collections.deque()
        self._leases: dict[str, _Lease] = {}
        self._recycling = 0
        self._broken = 0
        self._execs = self._recycled = self._reclaimed = 0
        self._started: asyncio.Future[None] | None = None
        self._background: list[asyncio.Task[None]] = []
        self._last_call = time.monotonic()

    # -- start-up ------------------------------------------------------------------

    async def _ensure_started(self) -> None:
        self._last_call = time.monotonic()
        if self._started is None:
            self._started = asyncio.ensure_future(self._start())
        await asyncio.shield(self._started)  # a start-up error is raised to every caller

    async def _start(self) -> None:
        self.runtime = make_runtime(self.cfg)
        root = Path(self.cfg.root_dir) if self.cfg.root_dir else default_root()
        # 0711 only where the sandbox runs as another uid, which must pass through.
        mode = 0o700 if self.runtime.sandbox_uid() in (None, os.geteuid()) else 0o711
        self._dir = await asyncio.to_thread(PoolDir, root, mode)
        if isinstance(self.runtime, ApptainerRuntime):
            await self.runtime.sweep()
        self.dir = self._dir.path
        boxes = [self.runtime.create(slot, self.dir / f"slot{slot}.0", 0) for slot in range(self.cfg.size)]
        await boxes[0].start()
        await self.runtime.probe(boxes[0])  # namespaces refused, image broken: one clear error now
        await asyncio.gather(*(b.start() for b in boxes[1:]))
        self._free.extend(boxes)
        loop = asyncio.get_running_loop()
        self._background.append(loop.create_task(self._watch()))
        log.info("sandbox pool %s: %d %s sandboxes in %s", self.name, self.cfg.size, self.runtime.name, self.dir)

    async def ready(self) -> PoolStats:
        """Wait until the warm sandboxes exist; raises the start-up error if there was one."""
        await self._ensure_started()
        return self.stats()

    # -- leases --------------------------------------------------------------------

    async def acquire(self, task_id: str, holder: Any | None = None, holder_worker: str | None = None, wait_s: float = 60.0) -> str:
        """A lease id for a free sandbox, waiting at most ``wait_s`` for one."""
        await self._ensure_started()
        if self._free:
            sandbox = self._free.popleft()
            metrics.observe("sandbox_lease_wait_seconds", 0.0, self.name)
        else:
            if len(self._waiters) >= self.cfg.max_waiting:
                raise SandboxUnavailable(f"sandbox pool {self.name}: {len(self._waiters)} callers already waiting (sandbox.max_waiting)")
            started = time.monotonic()
            sandbox = await self._wait_for_free(task_id, wait_s)
            metrics.observe("sandbox_lease_wait_seconds", time.monotonic() - started, self.name)
        metrics.inc("sandbox_leases", 1, self.name)
        lease = _Lease(uuid.uuid4().hex, task_id, sandbox, holder, holder_worker)
        self._leases[lease.id] = lease
        return lease.id

    async def _wait_for_free(self, task_id: str, wait_s: float) -> Sandbox:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Sandbox] = loop.create_future()
        self._waiters.append(fut)

        def expire() -> None:
            if not fut.done():
                fut.set_exception(
                    SandboxUnavailable(
                        f"sandbox pool {self.name}: no sandbox free for task {task_id} after {wait_s:g}s "
                        f"({self.cfg.size} in the pool, {len(self._leases)} leased, {len(self._waiters)} waiting)"
                    )
                )

        timer = loop.call_later(max(0.0, wait_s), expire)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._put_free(fut.result())  # handed over just as the caller went away
            raise
        finally:
            timer.cancel()
            try:
                self._waiters.remove(fut)
            except ValueError:
                pass

    def _put_free(self, sandbox: Sandbox) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(sandbox)
                return
        self._free.append(sandbox)

    def _lease(self, lease_id: str) -> _Lease:
        self._last_call = time.monotonic()
        lease = self._leases.get(lease_id)
        if lease is None:
            raise LeaseNotFound(f"sandbox pool {self.name}: lease {lease_id} is not held (released, or reclaimed after its holder died or its TTL passed)")
        return lease

    async def release(self, lease_id: str, failed: bool = False) -> bool:
        """Hand a sandbox back; ``failed`` destroys it. False if the lease was already gone."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return False
        self._give_back(lease, recycle=failed)
        return True

    def _give_back(self, lease: _Lease, recycle: bool) -> None:
        for fut in lease.inflight:
            fut.cancel()
        sandbox = lease.sandbox
        sandbox.uses += 1
        if recycle or sandbox.tainted or sandbox.uses >= self.cfg.max_uses or lease.inflight:
            reason = "failed" if recycle else "tainted" if sandbox.tainted else "max_uses" if sandbox.uses >= self.cfg.max_uses else "reclaimed"
            metrics.inc("sandbox_recycles", 1, self.name, reason)
            self._recycling += 1
            asyncio.get_running_loop().create_task(self._recycle(sandbox))
        else:
            asyncio.get_running_loop().create_task(self._wipe_and_free(sandbox))

    async def _wipe_and_free(self, sandbox: Sandbox) -> None:
        self._recycling += 1
        try:
            why = await sandbox.reset()
        except OSError as exc:
            why = f"dirty: {exc}"
        if why is None:
            self._recycling -= 1
            self._put_free(sandbox)
        else:  # the lease left something behind that cannot be undone in place: start over
            log.log(logging.DEBUG if why == "per_lease" else logging.WARNING, "sandbox pool %s: replacing %s (%s)", self.name, sandbox.name, why)
            metrics.inc("sandbox_recycles", 1, self.name, why.partition(":")[0])
            await self._recycle(sandbox)

    async def _recycle(self, old: Sandbox) -> None:
        """Destroy ``old`` and put a fresh sandbox in its slot (retrying while the runtime fails)."""
        assert self.runtime is not None and self.dir is not None
        try:
            await old.stop()
        except Exception:  # a stuck instance must not cost the slot
            log.exception("sandbox pool %s: stopping %s failed", self.name, old.name)
        generation = old.generation + 1
        broken = False
        while True:
            fresh = self.runtime.create(old.slot, self.dir / f"slot{old.slot}.{generation}", generation)
            try:
                await fresh.start()
                break
            except (SandboxError, OSError) as exc:
                log.error("sandbox pool %s: restarting slot %d failed: %s", self.name, old.slot, exc)
                shutil.rmtree(fresh.workdir, ignore_errors=True)
                if not broken:
                    broken, self._broken = True, self._broken + 1
                generation += 1
                await asyncio.sleep(_RETRY_START_S)
        if broken:
            self._broken -= 1
        self._recycled += 1
        self._recycling -= 1
        self._put_free(fresh)

    # -- using a lease -------------------------------------------------------------

    async def exec(
        self,
        lease_id: str,
        cmd: str | list[str],
        limits: SandboxLimits | None = None,
        stdin: bytes | None = None,
        env: dict[str, str] | None = None,
    ) -> ExecResult:
        """Run ``cmd`` in the leased sandbox; the payload's failures are in the result, not raised."""
        lease = self._lease(lease_id)
        started = time.monotonic()
        run = asyncio.ensure_future(lease.sandbox.exec(cmd, limits or self.cfg.limits, stdin, env))
        lease.inflight.add(run)
        try:
            await asyncio.wait({run})  # unlike `await run`, a reclaim's cancel of `run` does not cancel us
        except asyncio.CancelledError:
            run.cancel()
            raise
        finally:
            lease.inflight.discard(run)
        if run.cancelled():
            raise LeaseNotFound(f"sandbox pool {self.name}: lease {lease_id} was reclaimed while a command ran")
        result = run.result()
        self._execs += 1
        metrics.observe("sandbox_exec_seconds", time.monotonic() - started, self.name)
        if result.killed_reason in _TAINTING:
            lease.sandbox.tainted = True
        return result

    async def write_file(self, lease_id: str, path: str, data: bytes, mode: int = 0o644) -> None:
        """Put a file into the leased sandbox's ``/sandbox``."""
        self._lease(lease_id).sandbox.write_file(path, data, mode)

    async def read_file(self, lease_id: str, path: str, max_bytes: int = 16 * 1024 * 1024) -> bytes:
        """A file from the leased sandbox's ``/sandbox`` (no symlinks, at most ``max_bytes``)."""
        return self._lease(lease_id).sandbox.read_file(path, max_bytes)

    # -- housekeeping --------------------------------------------------------------

    def stats(self) -> PoolStats:
        return PoolStats(
            name=self.name, runtime=self.cfg.runtime, size=self.cfg.size, free=len(self._free), leased=len(self._leases),
            recycling=self._recycling, waiting=sum(not w.done() for w in self._waiters), execs=self._execs,
            recycled=self._recycled, reclaimed=self._reclaimed, broken=self._broken,
        )  # fmt: skip

    def leases(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [
            {"lease": lease.id, "task_id": lease.task_id, "sandbox": lease.sandbox.name, "age_s": now - lease.acquired_at} for lease in self._leases.values()
        ]

    def _reclaim(self, lease: _Lease, why: str) -> None:
        if self._leases.pop(lease.id, None) is None:
            return
        self._reclaimed += 1
        log.warning("sandbox pool %s: reclaimed the sandbox of task %s (%s)", self.name, lease.task_id, why)
        self._give_back(lease, recycle=True)

    async def _watch(self) -> None:
        """Reclaim leases of dead holders and past their TTL; exit when idle for long."""
        while True:
            await asyncio.sleep(self.cfg.liveness_interval_s)
            try:
                await self._check_leases()
            except Exception:  # the watcher must survive whatever one check hits
                log.exception("sandbox pool %s: lease check failed", self.name)
            idle = self.cfg.idle_exit_s
            if idle is not None and not self._leases and not self._waiters and time.monotonic() - self._last_call > idle:
                log.info("sandbox pool %s: idle for %.0fs, exiting", self.name, idle)
                await self.shutdown()
                # A graceful exit has to run as an actor task: ask ourselves for one.
                ray.get_runtime_context().current_actor.__ray_terminate__.remote()
                return

    async def _check_leases(self) -> None:
        now = time.monotonic()
        for lease in list(self._leases.values()):
            if now - lease.acquired_at > self.cfg.lease_ttl_s:
                self._reclaim(lease, f"held longer than sandbox.lease_ttl_s={self.cfg.lease_ttl_s:g}")
        # One ping per holder process, however many leases it holds.
        by_holder: dict[str, list[_Lease]] = collections.defaultdict(list)
        for lease in self._leases.values():
            if lease.holder is not None:
                by_holder[lease.holder_worker or str(id(lease.holder))].append(lease)
        groups = list(by_holder.values())
        verdicts = await asyncio.gather(*(_holder_state(g[0].holder, g[0].holder_worker) for g in groups))
        for group, verdict in zip(groups, verdicts):
            if verdict is not None:
                for lease in group:
                    self._reclaim(lease, f"its holder actor {verdict}")

    async def shutdown(self) -> None:
        """Stop every sandbox (leases end); the pool is unusable afterwards."""
        for task in self._background:
            if task is not asyncio.current_task():  # the idle watcher calls this itself
                task.cancel()
        for lease in list(self._leases.values()):
            for fut in lease.inflight:
                fut.cancel()
        boxes = [*self._free, *(lease.sandbox for lease in self._leases.values())]
        self._free.clear()
        self._leases.clear()
        await asyncio.gather(*(b.stop() for b in boxes), return_exceptions=True)
        if self._dir is not None:
            self._dir.remove()

    def __ray_shutdown__(self) -> None:
        # Graceful exit of a non-detached pool: leave no private directories behind.
        if self._dir is not None:
            self._dir.remove()


async def _holder_state(handle: Any, worker: str | None) -> str | None:
    """None while the holder lives as the same process; else why its leases are void."""
    try:
        current = await asyncio.wait_for(handle.__ray_call__.remote(holder_worker_id), _PING_TIMEOUT_S)
    except ray.exceptions.ActorDiedError:
        return "died"
    except (TimeoutError, ray.exceptions.ActorUnavailableError):
        return None  # busy or restarting: decide at the next check (the TTL is the backstop)
    except ray.exceptions.RayError as exc:
        log.warning("liveness check of a sandbox holder failed: %s", exc)
        return None
    if worker is not None and current != worker:
        return "was restarted"
    return None
