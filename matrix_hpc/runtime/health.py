"""What an actor tells the driver's health check: who it is, and whether its loop stalls.

Every actor (agents and the sink) answers ``ping`` with an :class:`ActorPing`. An agent
actor also runs a :class:`LoopLagWatcher`: a step that blocks the event loop
(``time.sleep``, a synchronous HTTP call) stalls every task of that actor, so the
watcher measures how late its own timer fires and reports stalls, naming the roles
whose steps (or ``setup()``) were running, at most once per ``report_every_s``. A stall
while nothing of the workflow ran (Ray's own work, an overloaded machine) is not the
workflow's doing and is only logged at debug level. Reports reach the driver's terminal
through the next ping.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass

__all__ = ["ActorPing", "LoopLagWatcher"]

log = logging.getLogger(__name__)


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


class LoopLagWatcher:
    """Measures event-loop lag with a timer; collects one warning per ``report_every_s`` at most."""

    def __init__(self, label: str, threshold_s: float, probe_s: float = 0.1, report_every_s: float = 10.0) -> None:
        self.label = label
        self.threshold_s = threshold_s
        self.probe_s = probe_s
        self.report_every_s = report_every_s
        self.worst_s = 0.0
        """The longest stall seen over the actor's life."""
        self._running: Counter[str] = Counter()
        self._window: set[str] = set()  # what ran (e.g. "role 'x'") at some point since the last probe
        self._pending: list[str] = []

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
        last_report = float("-inf")
        worst, stalls, roles = 0.0, 0, set()
        while True:
            t0 = loop.time()
            await asyncio.sleep(self.probe_s)
            lag = loop.time() - t0 - self.probe_s
            if lag >= self.threshold_s and not self._window:
                log.debug("%s: event loop stalled %.1fs with no step running", self.label, lag)
            elif lag >= self.threshold_s:
                worst, stalls = max(worst, lag), stalls + 1
                roles |= self._window
                self.worst_s = max(self.worst_s, lag)
            self._window = {r for r, n in self._running.items() if n > 0}
            if stalls and loop.time() - last_report >= self.report_every_s:
                self._report(worst, stalls, roles)
                last_report = loop.time()
                worst, stalls, roles = 0.0, 0, set()

    def _report(self, worst: float, stalls: int, roles: set[str]) -> None:
        times = f" ({stalls} stalls since the last warning)" if stalls > 1 else ""
        msg = (
            f"{self.label}: event loop blocked for {worst:.1f}s{times} while running: {', '.join(sorted(roles))}. "
            "Blocking code stalls every task of the actor: run it with `await asyncio.to_thread(fn, ...)`"
        )
        log.warning("%s", msg)
        self._pending.append(msg)
        del self._pending[:-20]  # a driver that stops pinging must not grow this forever
