"""What an actor tells the driver's health check: who it is, and whether its loop stalls.

Every actor (agents and the sink) answers ``ping`` with an :class:`ActorPing`. An agent
actor also runs a :class:`LoopLagWatcher`: a step that blocks the event loop
(``time.sleep``, a synchronous HTTP call) stalls every task of that actor, so the
watcher measures how late its own timer fires and reports stalls, naming the roles
whose steps (or ``setup()``) were running, at most once per ``report_every_s``. A stall
while nothing of the workflow ran (Ray's own work, an overloaded machine) is not the
workflow's doing and is only logged at debug level. Reports reach the driver's terminal
through the next ping.

A stall is not always a blocking step: with tens of thousands of tasks in an actor, a
full garbage collection over its live objects, or a machine whose CPUs are all taken,
holds the loop as long. :class:`LoopClock` splits each late interval into garbage
collection (``gc.callbacks``, any thread's: every Python thread waits for it), time
waiting for a CPU and time on one (the loop thread's ``/proc`` schedstat), and the rest
(off CPU: sleeping, waiting on I/O or a lock); the report names the largest share, and
only a stall that is neither collection nor CPU starvation is blamed on the roles running.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ActorPing", "LoopClock", "LoopLagWatcher", "StallShare"]

log = logging.getLogger(__name__)


def _machine_load() -> tuple[float, int]:
    """(1-minute load average, cores this process may use)."""
    try:
        return os.getloadavg()[0], len(os.sched_getaffinity(0))
    except (OSError, AttributeError):
        return 0.0, os.cpu_count() or 1


@dataclass(frozen=True)
class ActorPing:
    incarnation: str
    """A new value means Ray restarted the actor."""
    pid: int
    host: str
    warnings: tuple[str, ...] = ()
    """Warnings for the driver to print (loop stalls) since the previous ping."""
    progress: int = 0
    """Steps taken (an agent) or rows committed (the sink) so far: the driver's stall clock."""
    llm_calls: int = 0
    """LLM calls this incarnation completed (replayed ones not counted): movement a user can see
    while multi-turn tasks are still in flight (the progress line)."""
    llm_tokens: int = 0
    """Their output tokens."""
    ray_calls: int = 0
    """Batches this incarnation's outbox sent (one Ray call each): what batching saves."""


@dataclass(frozen=True)
class StallShare:
    """Where one late probe interval went, in seconds (see :class:`LoopClock`). The four
    parts add up to the whole interval (``late_s`` + ``idle_s``, the probe's own sleep)."""

    late_s: float
    gc_s: float
    """Garbage collection: on this thread's CPU time, or on another thread's while this one was off CPU."""
    cpu_wait_s: float | None
    """Runnable but not running (other processes had the CPUs); None where unknown."""
    on_cpu_s: float
    """The loop thread on a CPU, less garbage collection."""
    off_cpu_s: float
    """Neither: sleeping (the probe's own ``idle_s`` included), waiting on I/O or on a lock (the GIL included)."""
    idle_s: float = 0.0

    @property
    def cause(self) -> str:
        shares = {"gc": self.gc_s, "cpu_wait": self.cpu_wait_s or 0.0, "on_cpu": self.on_cpu_s, "off_cpu": self.off_cpu_s - self.idle_s}
        return max(shares, key=lambda k: shares[k])

    def describe(self) -> str:
        parts = [f"garbage collection {self.gc_s:.2f}s"]
        if self.cpu_wait_s is not None:
            parts.append(f"waiting for a CPU {self.cpu_wait_s:.2f}s")
        parts += [f"on CPU {self.on_cpu_s:.2f}s", f"off CPU {self.off_cpu_s:.2f}s"]
        return f"of the {self.late_s + self.idle_s:.2f}s probe interval: " + ", ".join(parts)


class LoopClock:
    """Cumulative clocks of the thread that samples it: wall, on CPU, waiting for a CPU
    (Linux ``/proc/thread-self/schedstat``; None elsewhere) and the process's garbage
    collection time. :meth:`install` hooks ``gc.callbacks``; call :meth:`sample` from
    the loop's thread."""

    def __init__(self) -> None:
        self.gc_s = 0.0
        self._gc_started: float | None = None

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started is not None:
            self.gc_s += time.perf_counter() - self._gc_started
            self._gc_started = None

    def install(self) -> None:
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def uninstall(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def sample(self) -> tuple[float, float, float | None, float]:
        """(wall, on CPU, waiting for a CPU or None, garbage collection), in seconds."""
        wait: float | None = None
        try:
            with open("/proc/thread-self/schedstat", "rb") as f:
                run_ns, wait_ns, _ = f.read().split()
            cpu, wait = int(run_ns) / 1e9, int(wait_ns) / 1e9
        except (OSError, ValueError):
            cpu = time.thread_time()
        return time.perf_counter(), cpu, wait, self.gc_s

    @staticmethod
    def share(before: tuple[float, float, float | None, float], after: tuple[float, float, float | None, float], idle_s: float) -> StallShare:
        """Split the interval between two samples into parts that add up to it; ``idle_s`` of it
        was the loop's own expected wait.

        A collection's wall time is not all collecting: on a busy machine much of it is the
        thread waiting for a CPU, which the thread's own clocks already count. So collection
        is charged to this thread's CPU time first, and the rest of it only to time this
        thread was off CPU (another thread collecting, holding the GIL); the wait is the
        scheduler's figure. (Charging all of it double-counted: parts summed past the stall,
        and a busy machine's stall was blamed on the actor's heap.)"""
        wall, cpu, gc_s = after[0] - before[0], after[1] - before[1], after[3] - before[3]
        wait = after[2] - before[2] if after[2] is not None and before[2] is not None else None
        cpu = min(cpu, wall)
        waited = min(wait or 0.0, wall - cpu)
        gc_here = min(gc_s, cpu)
        gc_elsewhere = min(gc_s - gc_here, wall - cpu - waited)
        off_cpu = wall - cpu - waited - gc_elsewhere
        return StallShare(max(0.0, wall - idle_s), gc_here + gc_elsewhere, None if wait is None else waited, cpu - gc_here, max(0.0, off_cpu), idle_s)


class LoopLagWatcher:
    """Measures event-loop lag with a timer; collects one warning per ``report_every_s`` at most."""

    def __init__(
        self, label: str, threshold_s: float, probe_s: float = 0.1, report_every_s: float = 10.0, machine_load: Callable[[], tuple[float, int]] | None = None
    ) -> None:
        """``machine_load``: (1-minute load average, usable cores), read at each report."""
        self.machine_load = machine_load or _machine_load
        self.label = label
        self.threshold_s = threshold_s
        self.probe_s = probe_s
        self.report_every_s = report_every_s
        self.worst_s = 0.0
        """The longest stall seen over the actor's life."""
        self._running: Counter[str] = Counter()
        self._window: set[str] = set()  # what ran (e.g. "role 'x'") at some point since the last probe
        self._pending: list[str] = []
        self.clock = LoopClock()

    def started(self, what: str) -> None:
        """``what`` (``role 'x'``, ``setup() of role 'x'``) runs on the loop until :meth:`ended`."""
        self._running[what] += 1
        self._window.add(what)

    def ended(self, what: str) -> None:
        self._running[what] -= 1

    def take_warnings(self) -> tuple[str, ...]:
        out, self._pending = tuple(self._pending), []
        return out

    async def run(self) -> None:
        if self.threshold_s <= 0:
            return
        loop = asyncio.get_running_loop()
        self.clock.install()
        try:
            await self._watch(loop)
        finally:
            self.clock.uninstall()

    async def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        # Each kind of stall (gc, cpu_wait, step) is reported at most once per report_every_s,
        # with its worst instance: on a busy machine a wait for a CPU, reported first, must not
        # hide or hold back a step that blocks the loop, the one the user can fix.
        last_report: dict[str, float] = {}
        worst: dict[str, StallShare] = {}
        stalls: dict[str, int] = {}
        roles: dict[str, set[str]] = {}
        while True:
            before = self.clock.sample()
            await asyncio.sleep(self.probe_s)
            share = LoopClock.share(before, self.clock.sample(), self.probe_s)
            if share.late_s >= self.threshold_s:
                if not self._window:
                    log.debug("%s: event loop stalled %.1fs with no step running (%s)", self.label, share.late_s, share.describe())
                else:
                    kind = share.cause if share.cause in ("gc", "cpu_wait") else "step"
                    if kind not in worst or share.late_s > worst[kind].late_s:
                        worst[kind] = share
                    stalls[kind] = stalls.get(kind, 0) + 1
                    roles.setdefault(kind, set()).update(self._window)
                    self.worst_s = max(self.worst_s, share.late_s)
            self._window = {r for r, n in self._running.items() if n > 0}
            for kind in [k for k in worst if loop.time() - last_report.get(k, float("-inf")) >= self.report_every_s]:
                self._report(worst.pop(kind), stalls.pop(kind), roles.pop(kind))
                last_report[kind] = loop.time()

    def _report(self, worst: StallShare, stalls: int, roles: set[str]) -> None:
        times = f" ({stalls} stalls since the last warning)" if stalls > 1 else ""
        load, cores = self.machine_load()
        # Said first when it holds: it may explain any cause below (other jobs take the CPUs).
        busy = f"the machine is busy (load average {load:.1f} on {cores} cores: other processes compete for its CPUs); " if load > cores else ""
        if worst.cause == "gc":
            body = (
                f"event loop late by {worst.late_s:.1f}s{times}, mostly in garbage collection ({worst.describe()}), "
                "not in a step: many live objects in the actor (tasks in flight and what they hold); more instances of its roles split them"
            )
        elif worst.cause == "cpu_wait":
            overcommitted = "the node's CPUs are overcommitted" if busy else "the node's CPUs are overcommitted (its own processes: fewer instances or threads)"
            body = f"event loop late by {worst.late_s:.1f}s{times}, mostly waiting for a CPU ({worst.describe()}), not in a step: {overcommitted}"
        else:
            body = (
                f"event loop blocked for {worst.late_s:.1f}s{times} while running: {', '.join(sorted(roles))} "
                f"({worst.describe()}). Blocking code stalls every task of the actor: run it with `await asyncio.to_thread(fn, ...)`"
            )
        msg = f"{self.label}: {busy}{body}"
        log.warning("%s", msg)
        self._pending.append(msg)
        del self._pending[:-20]  # a driver that stops pinging must not grow this forever
