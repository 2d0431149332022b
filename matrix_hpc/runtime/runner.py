"""The driver loop: feed the team, learn what is committed, recover lost tasks.

The driver is not in the data path: it sends each new task once (batched) to
the entry role and then only long-polls the sink. A task the sink has received
frees its in-flight slot (backpressure at ``max_in_flight``); one it has committed
leaves the driver's books. Once a second the driver pings the actors; when one came
back from a crash, tasks that nobody holds any more are re-sent (``attempt`` + 1) or, past ``max_attempts``, recorded as failed.

A run never hangs and never stops quietly: when no task moves (no step, nothing
received or committed) for ``stall_timeout_s``, the driver logs who holds the tasks
in flight and re-sends those nobody holds; if that does not help either, or a role
or the sink has no live actor left, or commits keep failing, it raises a
:class:`~matrix_hpc.runtime.team.TeamError` (:class:`RunAborted` for what the driver
itself finds) with one line, after which the caller commits what is finished.

The driver never waits on another process without a bound: every call to an actor or
the sink has a timeout (a batch the entry actor has not accepted stays held by the
driver, see :meth:`Team.dispatch`), so the stop flag, the health checks and the stall
check run whatever an actor does (frozen, or restarting where Ray cannot place it).
A watchdog beside the loop backs this up: a loop that has not come round for twice
``stall_timeout_s`` (and a minute) stops the run, and one that has not returned well
after a stop's grace is abandoned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from ray.exceptions import ActorDiedError, RayError

from ..store import RecordRow
from ..store.tokens import TokenUsage
from .ownership import Ledger, SinkFollower, StallClock
from .sink import SinkStats
from .task import Task
from .team import Team, TeamError

__all__ = ["AllFailing", "RunAborted", "RunProgress", "StopFlag", "drive"]

log = logging.getLogger(__name__)

SINK_CALL_S = 10.0
"""The longest the driver waits for one call to the sink (a poll's own wait included)."""
_STOP_SLACK_S = 15.0  # after a stop's grace: how long the watchdog gives the loop to return
_ROUND_S = 60.0  # above the longest a round's bounded awaits can add up to (a recovery: ~30 s)
_WATCH_S = 1.0
_REFILL_SHARE = 0.1
"""The driver refills ``max_in_flight`` once this share of its slots is free (or a poll's
0.25 s passed): like the outbox's window, it trades a wait of about half that share of a
task's time in flight (Little's law) for that many fewer driver rounds, each a poll and a
dispatch, Ray calls at three processes (issue 25: 20 rounds a second cost ~0.3 CPU ms per
LLM hop on collab at 100 in flight)."""


class RunAborted(TeamError):
    """The run cannot go on (stalled, a role or the sink gone, commits failing); one line says why."""


class AllFailing(RunAborted):
    """Every task finished so far failed with one kind (``run.stop_after_failures`` or more;
    ``bad_input`` rows aside): a bug that would fail every task, so the run stops before
    paying for the rest."""

    def __init__(self, kind: str, count: int, sample: str | None, limit: int) -> None:
        self.kind, self.count = kind, count
        e_g = f", e.g. {sample}" if sample else ""
        super().__init__(
            f"stopped early: the first {count} finished tasks all failed as {kind} (run.stop_after_failures={limit}){e_g}; "
            "tasks in flight were stopped; fix the cause and re-run: the rows not done yet run then"
        )


class StopFlag(Protocol):
    """Set from a signal handler (a ``threading.Event`` fits): stop intake and return.

    A flag may also carry ``grace_s``, which caps ``stop_grace_s`` and may shrink
    while the run is stopping (a SIGTERM after a SIGUSR2: the KILL is near).
    """

    def is_set(self) -> bool: ...


@dataclass
class RunProgress:
    total: int | None
    source_counts: dict[str, int] = field(default_factory=dict)
    """Kept by the source: ``skipped`` (rows already in the store)."""
    ok: int = 0
    failed: int = 0
    in_flight: int = 0
    tokens: TokenUsage = field(default_factory=TokenUsage)
    """Tokens of the records committed this life (the sink's count)."""
    resent: int = 0
    dispatched: int = 0
    """New tasks sent this run (resumed runs skip what the store has: this counts redone work)."""
    first_dispatch_at: float | None = None
    """Wall-clock time the first task was sent."""
    failed_by_kind: dict[str, int] = field(default_factory=dict)
    llm_by_role: dict[str, tuple[int, int]] = field(default_factory=dict)
    """(LLM calls, output tokens) per role so far, tasks in flight included (the actors' pings)."""
    ray_calls: int = 0
    """Batches the agents' outboxes sent so far (one Ray call each; the actors' pings)."""
    started_at: float = field(default_factory=time.monotonic)
    """When the first task could be sent (monotonic): start-up is over."""
    ended_at: float | None = None
    """When the last task was committed or the rest abandoned (monotonic): shut-down follows."""
    finished: bool = False
    interrupted: bool = False

    @property
    def skipped(self) -> int:
        return self.source_counts.get("skipped", 0)

    @property
    def done(self) -> int:
        return self.ok + self.failed

    @property
    def elapsed_s(self) -> float:
        """Time spent running tasks: from the start (or re-start) of intake to its end."""
        return (self.ended_at or time.monotonic()) - self.started_at

    @property
    def remaining(self) -> int | None:
        return None if self.total is None else max(0, self.total - self.skipped - self.done)


async def drive(
    team: Team,
    tasks: Iterator[Task],
    progress: RunProgress,
    max_in_flight: int,
    batch_size: int,
    max_attempts: int,
    health_interval_s: float = 1.0,
    on_progress: Callable[[RunProgress], None] | None = None,
    stop: StopFlag | None = None,
    stop_grace_s: float = 0.0,
    stall_timeout_s: float = 0.0,
    stop_after_failures: int = 0,
) -> RunProgress:
    """Run every task to a committed record, or until ``stop`` is set and the tasks in
    flight are committed or ``stop_grace_s`` has passed (the rest are abandoned).

    Raises :class:`TeamError` (:class:`RunAborted` for what the driver finds) when the run cannot go on;
    ``stall_timeout_s`` = 0 turns the stall check off. When the first ``stop_after_failures``
    (0: off) tasks to finish all failed with one kind, raises :class:`AllFailing`."""
    d = _Driver(
        team, tasks, progress, max_in_flight, batch_size, max_attempts, health_interval_s, on_progress, stop, stop_grace_s, stall_timeout_s, stop_after_failures
    )
    # The watchdog: the loop's awaits are bounded, and this makes sure of it. It needs
    # nothing from the loop but its clock, so it runs whatever the loop waits on.
    main = asyncio.ensure_future(d.run())
    stop_seen: float | None = None
    try:
        while True:
            done, _ = await asyncio.wait({main}, timeout=_WATCH_S)
            if done:
                return main.result()
            now = time.monotonic()
            if stop is not None and stop.is_set():
                stop_seen = stop_seen or now
                if now > stop_seen + min(stop_grace_s, getattr(stop, "grace_s", stop_grace_s)) + _STOP_SLACK_S:
                    log.warning("stopping: the driver's loop is still waiting on %s; abandoning the tasks in flight", d.doing)
                    progress.interrupted, progress.in_flight = True, len(d.ledger.active)
                    return progress
            if stall_timeout_s and now - d.beat > max(2 * stall_timeout_s, _ROUND_S):
                raise RunAborted(
                    f"stalled: the driver waited {now - d.beat:.0f}s on {d.doing} (run.stall_timeout_s={stall_timeout_s:g}); "
                    f"{len(d.ledger)} in flight; committed work is kept, re-run to resume"
                )
    finally:
        progress.ended_at = progress.ended_at or time.monotonic()
        if not main.done():
            main.cancel()
            with contextlib.suppress(BaseException):
                await main


class _Driver:
    """One run of :func:`drive`: the loop and what it does each round (the books it keeps
    are :mod:`matrix_hpc.runtime.ownership`'s)."""

    def __init__(
        self, team: Team, tasks: Iterator[Task], progress: RunProgress, max_in_flight: int, batch_size: int, max_attempts: int,
        health_interval_s: float, on_progress: Callable[[RunProgress], None] | None, stop: StopFlag | None, stop_grace_s: float,
        stall_timeout_s: float, stop_after_failures: int,
    ) -> None:  # fmt: skip
        self.team, self.tasks, self.progress, self.on_progress, self.stop = team, tasks, progress, on_progress, stop
        self.max_in_flight, self.batch_size, self.health_interval_s = max_in_flight, batch_size, health_interval_s
        self.stop_grace_s, self.stop_after_failures = stop_grace_s, stop_after_failures
        now = time.monotonic()
        self.ledger = Ledger(max_attempts)
        self.sink = SinkFollower()
        self.clock = StallClock(stall_timeout_s, now)
        self.exhausted = False  # the source has no more tasks
        self.need_recovery = False
        self.next_health = now + health_interval_s
        self.last_poll = 0.0
        self.stop_started: float | None = None
        self.grace = stop_grace_s
        self.commit_error: str | None = None
        self.dead_seen = 0
        self.sink_silent = False  # a poll went unanswered (said once per silence)
        self.beat = now  # the loop's last round: the watchdog's clock
        self.doing = "starting"  # what the loop awaits now (the watchdog names it)

    async def run(self) -> RunProgress:
        while True:
            self.beat = time.monotonic()
            stopping = self._stopping()
            await self._intake(stopping)
            stats = await self._poll()
            self._account(stats)
            if self.on_progress:
                self.on_progress(self.progress)
            inflight = len(self.ledger)
            if (self.exhausted or stopping) and inflight and not self.ledger.active and not self.sink_silent:
                self.doing = "the sink (flush)"
                await self._to_sink_or_go_on(self.team.sink.flush.remote(), "a flush")  # the last tasks are in: no need to wait for the timer
            over = stopping and time.monotonic() >= self.stop_started + self.grace  # type: ignore[operator]
            if (self.exhausted and not inflight) or (stopping and (not inflight or over)):
                self.progress.finished = self.exhausted and not inflight
                self.progress.interrupted = stopping and not self.progress.finished
                if self.progress.finished:  # the counters' last word: pings are a second apart
                    await self._count()
                return self.progress
            if time.monotonic() >= self.next_health:
                self.next_health = time.monotonic() + self.health_interval_s
                await self._health(stopping)

    def _stopping(self) -> bool:
        if self.stop is None or not self.stop.is_set():
            return False
        self.grace = min(self.stop_grace_s, getattr(self.stop, "grace_s", self.stop_grace_s))  # read each round: it may shrink
        if self.stop_started is None:
            self.stop_started = time.monotonic()
            # INFO: whoever set the flag (the CLI, the Slurm bootstrap) already told the user.
            log.info("stopping: no new tasks; %d in flight get %.0fs to finish", len(self.ledger), self.grace)
        return True

    async def _intake(self, stopping: bool) -> None:
        """New tasks up to ``max_in_flight``; already-failed rows go straight to the sink.
        While commits fail, the sink holds every received row: no more are taken in."""
        new_tasks: list[Task] = []
        prefailed: list[RecordRow] = []
        while not self.exhausted and not stopping and not self.commit_error and len(self.ledger.active) < self.max_in_flight:
            try:
                task = next(self.tasks)
            except StopIteration:
                self.exhausted = True
                break
            self.ledger.take(task)
            if task.done:
                prefailed.append(RecordRow.from_record(task.to_record()))
            else:
                new_tasks.append(Task(id=task.id, row=task.row, next_role=task.next_role, retry_of=task.retry_of))
        if new_tasks or prefailed:
            self.progress.dispatched += len(new_tasks) + len(prefailed)
            if self.progress.first_dispatch_at is None:
                self.progress.first_dispatch_at = time.time()
        if prefailed:
            self.doing = "the sink (failed input rows)"
            await self._to_sink_or_go_on(self.team.sink.receive.remote(prefailed), "the failed input rows")
        self.doing = "the entry role (new tasks)"
        await self.team.dispatch(new_tasks, self.batch_size)  # bounded: a batch not accepted in time stays held by the driver

    async def _poll(self) -> SinkStats:
        """What the sink received and committed since the last poll (at most 20 polls a second,
        each waiting for a tenth of the slots to free while new tasks wait for them: each is a
        Ray call, and news comes in batches anyway); the books follow it."""
        await asyncio.sleep(max(0.0, self.last_poll + 0.05 - time.monotonic()))
        self.last_poll = time.monotonic()
        self.doing = "the sink (poll)"
        sink = self.sink
        refill = not (self.exhausted or self.stop_started is not None or self.commit_error)
        min_received = max(1, int(self.max_in_flight * _REFILL_SHARE)) if refill else 1  # else: only the books wait
        try:
            call = self.team.sink.poll.remote(sink.incarnation, sink.received_off, sink.committed_off, 0.25, min_received)
            inc, received, committed, now = await self._to_sink(call)
        except TimeoutError:  # no news this round; the checks below still run
            if not self.sink_silent:
                log.warning("the sink did not answer a poll within %.0fs; health and stall checks go on", SINK_CALL_S)
            self.sink_silent = True
            return sink.stats
        if self.sink_silent:
            log.warning("the sink answers again")
        self.sink_silent = False
        if sink.update(inc, received, committed, now):  # a restarted sink lost what it had not committed
            log.warning("the sink restarted; checking which tasks are committed")
            self.need_recovery = True
        if sink.untallied is not None:  # counted by the new sink; until it answers, the next poll asks again
            try:
                sink.tallied(await self._to_sink(self.team.sink.tally.remote(*sink.untallied)))
            except (TimeoutError, RayError) as exc:
                log.info("the sink's count of rows committed before its restart is postponed: %s", type(exc).__name__)
        self.ledger.received(received)
        self.ledger.committed(committed)
        if received or committed:
            self.clock.moved(time.monotonic())
        return sink.stats

    def _account(self, stats: SinkStats) -> None:
        """Progress from the sink's stats; the run stops when commits gave up or every task fails alike."""
        p = self.progress
        p.ok, p.failed, p.failed_by_kind = stats.ok, stats.failed, stats.failed_by_kind
        p.tokens = stats.tokens
        p.in_flight = len(self.ledger.active)
        if stats.gave_up:
            raise RunAborted(stats.gave_up)
        # Bad input rows are the data's, not the workflow's (and go to the sink first): not counted.
        ran = {kind: n for kind, n in stats.failed_by_kind.items() if kind != "bad_input"}
        ending = self.exhausted and not self.ledger  # not when the run ends anyway
        if self.stop_after_failures and not stats.ok and len(ran) == 1 and sum(ran.values()) >= self.stop_after_failures and not ending:
            raise AllFailing(*next(iter(ran.items())), stats.first_failure, self.stop_after_failures)
        if stats.commit_error != self.commit_error:
            self.commit_error = stats.commit_error
            if self.commit_error:
                log.warning("commits to the store are failing (%s); the sink keeps the rows and retries", self.commit_error)
            else:
                log.warning("commits to the store succeed again")

    async def _count(self) -> None:
        """The actors' LLM calls and Ray calls as of now (one ping round; the run is over)."""
        self.doing = "the actors' final count"
        try:
            await self.team.check()
        except TeamError:  # a role is gone: keep the last check's counts
            return
        self.progress.llm_by_role = self.team.llm_activity()
        self.progress.ray_calls = self.team.ray_calls()

    async def _health(self, stopping: bool) -> None:
        """Ping the actors: restarts and deaths call for a recovery; no step anywhere for
        ``stall_timeout_s`` calls for the stall remedy."""
        self.doing = "the actors' health check"
        restarted, _ = await self.team.check()
        self.progress.llm_by_role = self.team.llm_activity()
        self.progress.ray_calls = self.team.ray_calls()
        if len(self.team.dead) > self.dead_seen:  # what the dead held is nowhere now (dispatch may have found them first)
            self.dead_seen, self.need_recovery = len(self.team.dead), True
        exempt = bool(self.commit_error) or not self.ledger  # a failing disk has its own limit
        if self.clock.check(sum(self.team.steps.values()), exempt, time.monotonic()) and not stopping:
            self.doing = "the actors (what they hold)"
            await self._on_stall()
        if restarted:
            log.warning("actor(s) restarted after a crash: %s", ", ".join(restarted))
            self.need_recovery = True
        if self.need_recovery:
            self.doing = "the actors (recovery)"
            self.need_recovery = not await self._recover()

    async def _on_stall(self) -> None:
        """Say where the tasks in flight are; re-send those nobody holds; then give up."""
        silent: list[str] = []  # actors that did not answer (frozen, or restarting)
        try:
            held = await self.team.held_by(silent=silent)
        except (TimeoutError, RayError) as exc:
            held = {}
            log.warning("stall: cannot ask the actors what they hold (%s)", exc.__class__.__name__)
        where = self.ledger.holders(held)
        holders = ", ".join(f"{name.split('/', 1)[-1]}: {n}" for name, n in sorted(where.items()) if n) or "nobody"
        if silent:
            holders += "; not answering: " + ", ".join(name.split("/", 1)[-1] for name in sorted(silent))
        # A silent actor may hold any task: nothing is lost for sure then.
        nobody = self.ledger.lost({i for ids in held.values() for i in ids}) if held and not silent else []
        now = time.monotonic()
        idle = self.clock.idle_s(now)
        if self.clock.remedy_tried:
            raise RunAborted(
                f"stalled: no task moved for {idle:.0f}s (run.stall_timeout_s={self.clock.timeout_s:g}); {len(self.ledger)} in flight held by {holders}; "
                "committed work is kept, re-run to resume"
            )
        log.warning("no task moved for %.0fs: %d in flight held by %s; re-sending %d held by nobody", idle, len(self.ledger), holders, len(nobody))
        self.clock.remedy(now)
        if nobody:
            await self._resend(nobody)

    async def _recover(self) -> bool:
        """Re-send in-flight tasks that no actor holds; False if actors are not back yet."""
        try:
            held = await self.team.held_ids()
            await asyncio.sleep(0.2)  # a second look covers tasks caught in a hand-over
            held |= await self.team.held_ids()
            committed = set(await self._to_sink(self.team.sink.committed.remote(list(self.ledger.inflight))))  # bounded: a TimeoutError postpones
        except (TimeoutError, RayError) as exc:  # an actor still restarting
            log.info("recovery postponed: %s", exc.__class__.__name__)
            return False
        self.ledger.committed(committed)
        lost = self.ledger.lost(held)
        if lost:
            await self._resend(lost)
        return True

    async def _resend(self, lost: list[str]) -> None:
        again, gave_up = self.ledger.plan_resend(lost, self.team.entry)
        self.progress.resent += len(again)
        if again or gave_up:
            log.warning("re-sending %d lost task(s); recording %d as failed (bad input, or lost %d times)", len(again), len(gave_up), self.ledger.max_attempts)
        await self.team.dispatch(again, self.batch_size)
        if gave_up:
            await self._to_sink_or_go_on(self.team.sink.receive.remote(gave_up), "the failed records")

    async def _to_sink(self, call: Any, timeout_s: float = SINK_CALL_S) -> Any:
        """Await a call to the sink for at most ``timeout_s`` (raises ``asyncio.TimeoutError``:
        the call itself still reaches the sink); a sink whose restarts are used up stops the run."""
        try:
            return await asyncio.wait_for(call, timeout_s)
        except ActorDiedError:
            raise RunAborted("the sink is dead (restarts used up); committed work is kept, re-run to resume") from None

    async def _to_sink_or_go_on(self, call: Any, what: str) -> None:
        """A call whose answer the loop need not wait for: past the bound, say so and go on."""
        try:
            await self._to_sink(call)
        except TimeoutError:
            log.warning("the sink did not answer %s within %.0fs; going on (Ray still delivers it)", what, SINK_CALL_S)
