"""Full garbage collections paced to a share of the time, not to the heap's growth.

CPython (3.11) runs a full (generation 2) collection whenever the objects promoted
since the last one exceed a quarter of those that survived it. An agent actor with
50,000 tasks in flight holds millions of objects, and every hop promotes fresh ones
(the unpickled task, its request's objects, which live as long as the LLM call): a
full pass then comes every few seconds, walks every live object, and stalls the loop
for seconds, costing CPU in proportion to the promotion rate times four, whatever
the heap size. Measured at 50,000 in flight, about 40% of the actors' loop time.

:class:`GcBudget` turns automatic full collections off (the young generations stay
automatic, with a larger first threshold) and runs one itself when the last one's
duration, divided by ``share``, has passed: full passes take at most ``share`` of the
wall time, and garbage in reference cycles is still freed, later. Objects without
cycles (nearly all of a task) are freed by reference counting as before.

At install, every object alive then (the modules Ray, zarr and the agent imported, ~80,000
objects) is moved to the permanent generation (``gc.freeze``): they live as long as the
process, and walking them cost each idle actor a ~30 ms pass every second, 3% of a core
whatever the load. Full passes then walk only what the run itself keeps.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable

__all__ = ["GcBudget"]

log = logging.getLogger(__name__)

_NEVER = 2**31 - 1  # generation 2's threshold: no automatic full collection


class GcBudget:
    """Run full collections at most ``share`` of the time (at least every ``max_interval_s``)."""

    def __init__(
        self,
        share: float = 0.05,
        min_interval_s: float = 1.0,
        max_interval_s: float = 60.0,
        young_threshold: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        collect: Callable[[int], int] = gc.collect,
    ) -> None:
        self.share = share
        self.min_interval_s = min_interval_s
        self.max_interval_s = max_interval_s
        self.young_threshold = young_threshold
        self._clock = clock
        self._collect = collect
        self.collections = 0
        self.spent_s = 0.0
        """Time spent in the full collections run here."""
        self.next_at = clock() + min_interval_s
        self._saved: tuple[int, int, int] | None = None

    def install(self) -> None:
        """Take over full collections in this process (young ones stay automatic), and
        freeze what is alive now: start-up's objects are never walked again."""
        if self._saved is None:
            self._saved = gc.get_threshold()
            gc.set_threshold(self.young_threshold, self._saved[1], _NEVER)
            self._collect(2)  # start-up's garbage is freed, not frozen
            gc.freeze()

    def uninstall(self) -> None:
        if self._saved is not None:
            gc.set_threshold(*self._saved)
            gc.unfreeze()
            self._saved = None

    def tick(self) -> bool:
        """Run a full collection if it is due; True if one ran."""
        now = self._clock()
        if now < self.next_at:
            return False
        self._collect(2)
        took = self._clock() - now
        self.collections += 1
        self.spent_s += took
        self.next_at = now + took + min(self.max_interval_s, max(self.min_interval_s, took / self.share))
        if took > 0.5:
            log.debug("full garbage collection took %.2fs; the next in %.0fs", took, self.next_at - now - took)
        return True

    async def run(self, every_s: float = 0.5) -> None:
        """Check every ``every_s`` on the event loop (a full pass stalls it either way)."""
        self.install()
        try:
            while True:
                await asyncio.sleep(every_s)
                self.tick()
        finally:
            self.uninstall()
