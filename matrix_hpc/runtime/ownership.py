"""Who holds a task: the protocol that makes every id end in the store exactly once.

**The invariant.** At every moment a task of the run is held by exactly one of:

1. the driver's :class:`Ledger`, awaiting dispatch (a batch the entry actor has not
   accepted yet is still the driver's: ``Team.dispatch``);
2. one agent actor: queued, running a step, or in its outbox until the next actor has
   accepted the batch (``AgentActor.held_ids``);
3. one delivery in flight between two actors (counted as the sender's, point 2);
4. the sink: received, then committed to the store.

**Who may send a copy.** Only the driver makes a new attempt of a task, and only of one
that nobody holds any more (:meth:`Ledger.lost`): after an actor came back from a crash
(recovery), or when no task moved for ``run.stall_timeout_s`` (the stall remedy). Both
go through :meth:`Ledger.plan_resend`, which bounds attempts (``run.max_attempts``; past
it the task is recorded as failed, ``lost``). Nothing else copies a task. Moving one
delivery is not copying: Ray retries a ``receive`` on the receiver's next incarnation
(``max_task_retries=-1``), and a batch a receiver gone for good refused (it never took
it) goes to the role's other instances (``Outbox``, ``Team.dispatch``).

**The backstop.** The sink refuses a second record of an id (the store's own check), so
even a copy made when a holder was only slow, not gone, is written once.

The driver's side of the protocol is here, free of Ray, so it is tested without a team:
the :class:`Ledger` (what was sent and not committed), the :class:`SinkFollower` (what
the sink says, across its restarts) and the :class:`StallClock` (when a task last moved).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..store import RecordRow
from .sink import SinkStats
from .task import Task

__all__ = ["Ledger", "SinkFollower", "StallClock"]


class Ledger:
    """The tasks the driver sent this run that the sink has not committed (``inflight``),
    and of those the ones it has not received yet (``active``: what ``run.max_in_flight``
    bounds). Tasks are kept as sent, so a lost one can be sent again."""

    def __init__(self, max_attempts: int) -> None:
        self.max_attempts = max_attempts
        self.inflight: dict[str, Task] = {}
        self.active: set[str] = set()

    def __len__(self) -> int:
        return len(self.inflight)

    def take(self, task: Task) -> None:
        """A task from the source, about to be dispatched (or, already failed, recorded)."""
        self.inflight[task.id] = task
        self.active.add(task.id)

    def received(self, ids: list[str]) -> None:
        """The sink has these: their in-flight slots are free (they may not be committed yet)."""
        self.active.difference_update(ids)

    def committed(self, ids: list[str] | set[str]) -> None:
        """Durable in the store: they leave the books."""
        for tid in ids:
            self.inflight.pop(tid, None)
            self.active.discard(tid)

    def lost(self, held: set[str]) -> list[str]:
        """Tasks in flight that no actor holds (``held``: every id the live actors hold)."""
        return [tid for tid in self.inflight if tid not in held]

    def holders(self, held: dict[str, list[str]]) -> dict[str, int]:
        """How many of the tasks in flight each actor holds."""
        return {name: sum(1 for i in ids if i in self.inflight) for name, ids in held.items()}

    def plan_resend(self, lost: list[str], entry: str) -> tuple[list[Task], list[RecordRow]]:
        """For lost tasks: new attempts to send to ``entry``, and records of those that end
        here (a row the source had failed: its record; a task lost ``max_attempts`` times:
        failed as ``lost``). The new attempts count in flight again."""
        again: list[Task] = []
        gave_up: list[RecordRow] = []
        for tid in lost:
            old = self.inflight[tid]
            if old.done:  # a row the source already failed (bad input): its record, not a new task
                gave_up.append(RecordRow.from_record(old.to_record()))
            elif old.attempt >= self.max_attempts:
                t = Task(id=tid, row=old.row, next_role=None, attempt=old.attempt, retry_of=old.retry_of)
                t.fail("lost", f"task {tid} was lost with a crashed actor {old.attempt} times", role="runner")
                gave_up.append(RecordRow.from_record(t.to_record()))
            else:
                old.attempt += 1
                again.append(Task(id=tid, row=old.row, next_role=entry, attempt=old.attempt, retry_of=old.retry_of))
                self.active.add(tid)
        return again, gave_up


@dataclass
class SinkFollower:
    """What the sink has told the driver, across the sink's restarts: its incarnation, the
    offsets read in its received and committed id logs, and its stats added up over every
    incarnation of this run (a restarted sink counts from zero and lost what it had not
    committed: the caller then checks what is committed, see ``recover``). What a dead
    incarnation committed after its last poll is in no poll's stats: those rows are
    ``untallied`` until the caller has the new sink count them (``SinkActor.tally``) and hands
    the counts to :meth:`tallied`, so the run's counts add up to the store's."""

    incarnation: str | None = None
    received_off: int = 0
    committed_off: int = 0
    earlier: SinkStats = field(default_factory=SinkStats)
    """Earlier incarnations' stats, added up."""
    seen: SinkStats = field(default_factory=SinkStats)
    """The current incarnation's last stats."""
    untallied: tuple[int, int] | None = None
    """Rows ``lo:hi`` of the part committed by earlier incarnations after their last poll."""

    def update(self, incarnation: str | None, received: list[str], committed: list[str], now: SinkStats) -> bool:
        """Take one poll's answer; True when it comes from a restarted sink."""
        restarted = False
        if incarnation != self.incarnation:
            if self.incarnation is not None:
                restarted = True
                lo = self.untallied[0] if self.untallied else self.seen.rows
                if now.start_rows > lo:
                    self.untallied = (lo, now.start_rows)
                self.earlier = self.earlier.plus(self.seen)
            self.incarnation, self.received_off, self.committed_off = incarnation, 0, 0
        self.seen = now
        self.received_off += len(received)
        self.committed_off += len(committed)
        return restarted

    def tallied(self, missed: SinkStats) -> None:
        """The counts of the ``untallied`` rows: added once."""
        self.earlier, self.untallied = self.earlier.plus(missed), None

    @property
    def stats(self) -> SinkStats:
        return self.earlier.plus(self.seen)


@dataclass
class StallClock:
    """When a task last moved (received, committed, or a step taken anywhere), and whether
    the stall's first remedy (re-send what nobody holds) was tried since."""

    timeout_s: float
    """``run.stall_timeout_s``; 0: never stalled."""
    moved_at: float
    remedy_tried: bool = False
    steps_seen: int = -1

    def moved(self, now: float) -> None:
        self.moved_at, self.remedy_tried = now, False

    def check(self, steps: int, exempt: bool, now: float) -> bool:
        """At a health check: the actors' step count so far. ``exempt`` (commits failing, which
        have their own limit, or nothing in flight) counts as movement. True when stalled."""
        if steps != self.steps_seen or exempt:
            self.steps_seen = steps
            self.moved(now)
            return False
        return bool(self.timeout_s) and now - self.moved_at > self.timeout_s

    def idle_s(self, now: float) -> float:
        return now - self.moved_at

    def remedy(self, now: float) -> None:
        """The first remedy is under way: the clock starts again, and the next stall stops the run."""
        self.remedy_tried, self.moved_at = True, now
