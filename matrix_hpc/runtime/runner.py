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
    inflight: dict[str, Task] = {}  # sent and not yet committed: what recovery re-sends
    active: set[str] = set()  # sent and not yet received by the sink: what backpressure counts
    received_off = committed_off = 0
    last_poll = 0.0
    incarnation: str | None = None
    exhausted = False
    need_recovery = False
    next_health = time.monotonic() + health_interval_s
    stop_started: float | None = None
    grace = stop_grace_s
    moved_at = time.monotonic()  # last time a task moved: the stall clock
    steps_seen = -1
    stall_resent = False  # the stall's first remedy (re-send what nobody holds) was tried
    commit_error: str | None = None
    dead_seen = 0
    earlier = SinkStats()  # what earlier incarnations of the sink committed in this run
    seen = SinkStats()  # the current incarnation's last stats
    beat = time.monotonic()  # the loop's last round: the watchdog's clock
    doing = "starting"  # what the loop awaits now (the watchdog names it)
    sink_silent = False  # a poll went unanswered (said once per silence)

    async def to_sink(call: Any, timeout_s: float = SINK_CALL_S) -> Any:
        """Await a call to the sink for at most ``timeout_s`` (raises ``asyncio.TimeoutError``:
        the call itself still reaches the sink); a sink whose restarts are used up stops the run."""
        try:
            return await asyncio.wait_for(call, timeout_s)
        except ActorDiedError:
            raise RunAborted("the sink is dead (restarts used up); committed work is kept, re-run to resume") from None

    async def to_sink_or_go_on(call: Any, what: str) -> None:
        """A call whose answer the loop need not wait for: past the bound, say so and go on."""
        try:
            await to_sink(call)
        except TimeoutError:
            log.warning("the sink did not answer %s within %.0fs; going on (Ray still delivers it)", what, SINK_CALL_S)

    async def resend(lost: list[str]) -> None:
        again, gave_up = [], []
        for tid in lost:
            old = inflight[tid]
            if old.done:  # a row the source already failed (bad input): its record, not a new task
                gave_up.append(RecordRow.from_record(old.to_record()))
            elif old.attempt >= max_attempts:
                t = Task(id=tid, row=old.row, next_role=None, attempt=old.attempt)
                t.fail("lost", f"task {tid} was lost with a crashed actor {old.attempt} times", role="runner")
                gave_up.append(RecordRow.from_record(t.to_record()))
            else:
                old.attempt += 1
                again.append(Task(id=tid, row=old.row, next_role=team.entry, attempt=old.attempt))
                active.add(tid)
        progress.resent += len(again)
        if again or gave_up:
            log.warning("re-sending %d lost task(s); recording %d as failed (bad input, or lost %d times)", len(again), len(gave_up), max_attempts)
        await team.dispatch(again, batch_size)
        if gave_up:
            await to_sink_or_go_on(team.sink.receive.remote(gave_up), "the failed records")

    async def on_stall() -> None:
        """Say where the tasks in flight are; re-send those nobody holds; then give up."""
        nonlocal stall_resent, moved_at
        silent: list[str] = []  # actors that did not answer (frozen, or restarting)
        try:
            held = await team.held_by(silent=silent)
        except (TimeoutError, RayError) as exc:
            held = {}
            log.warning("stall: cannot ask the actors what they hold (%s)", exc.__class__.__name__)
        where = {name: sum(1 for i in ids if i in inflight) for name, ids in held.items()}
        holders = ", ".join(f"{name.split('/', 1)[-1]}: {n}" for name, n in sorted(where.items()) if n) or "nobody"
        if silent:
            holders += "; not answering: " + ", ".join(name.split("/", 1)[-1] for name in sorted(silent))
        all_held = {i for ids in held.values() for i in ids}
        nobody = [tid for tid in inflight if tid not in all_held] if held and not silent else []  # a silent actor may hold any
        idle = time.monotonic() - moved_at
        if stall_resent:
            raise RunAborted(
                f"stalled: no task moved for {idle:.0f}s (run.stall_timeout_s={stall_timeout_s:g}); {len(inflight)} in flight held by {holders}; "
                "committed work is kept, re-run to resume"
            )
        log.warning("no task moved for %.0fs: %d in flight held by %s; re-sending %d held by nobody", idle, len(inflight), holders, len(nobody))
        stall_resent = True
        moved_at = time.monotonic()
        if nobody:
            await resend(nobody)

    async def recover() -> bool:
        """Re-send in-flight tasks that no actor holds; False if actors are not back yet."""
        try:
            held = await team.held_ids()
            await asyncio.sleep(0.2)  # a second look covers tasks caught in a hand-over
            held |= await team.held_ids()
            committed = set(await to_sink(team.sink.committed.remote(list(inflight))))  # bounded: a TimeoutError postpones
        except (TimeoutError, RayError) as exc:  # an actor still restarting
            log.info("recovery postponed: %s", exc.__class__.__name__)
            return False
        for tid in committed:
            inflight.pop(tid, None)
            active.discard(tid)
        lost = [tid for tid in inflight if tid not in held]
        if lost:
            await resend(lost)
        return True

    async def run_loop() -> RunProgress:
        nonlocal received_off, committed_off, last_poll, incarnation, exhausted, need_recovery, next_health, stop_started
        nonlocal grace, moved_at, steps_seen, stall_resent, commit_error, dead_seen, earlier, seen, beat, doing, sink_silent
        while True:
            beat = time.monotonic()
            stopping = stop is not None and stop.is_set()
            if stopping:
                grace = min(stop_grace_s, getattr(stop, "grace_s", stop_grace_s))  # read each round: it may shrink
                if stop_started is None:
                    stop_started = time.monotonic()
                    # INFO: whoever set the flag (the CLI, the Slurm bootstrap) already told the user.
                    log.info("stopping: no new tasks; %d in flight get %.0fs to finish", len(inflight), grace)
            # Intake, bounded by max_in_flight; already-failed rows go straight to the sink.
            new_tasks: list[Task] = []
            prefailed: list[RecordRow] = []
            # While commits fail, the sink holds every received row: take no more in.
            while not exhausted and not stopping and not commit_error and len(active) < max_in_flight:
                try:
                    task = next(tasks)
                except StopIteration:
                    exhausted = True
                    break
                inflight[task.id] = task
                active.add(task.id)
                if task.done:
                    prefailed.append(RecordRow.from_record(task.to_record()))
                else:
                    new_tasks.append(Task(id=task.id, row=task.row, next_role=task.next_role))
            if new_tasks or prefailed:
                progress.dispatched += len(new_tasks) + len(prefailed)
                if progress.first_dispatch_at is None:
                    progress.first_dispatch_at = time.time()
            if prefailed:
                doing = "the sink (failed input rows)"
                await to_sink_or_go_on(team.sink.receive.remote(prefailed), "the failed input rows")
            doing = "the entry role (new tasks)"
            await team.dispatch(new_tasks, batch_size)  # bounded: a batch not accepted in time stays held by the driver

            # At most 20 polls a second: each is a Ray call, and news comes in batches anyway.
            await asyncio.sleep(max(0.0, last_poll + 0.05 - time.monotonic()))
            last_poll = time.monotonic()
            doing = "the sink (poll)"
            try:
                inc, received, committed, now = await to_sink(team.sink.poll.remote(incarnation, received_off, committed_off, 0.25))
            except TimeoutError:  # no news this round; the checks below still run
                if not sink_silent:
                    log.warning("the sink did not answer a poll within %.0fs; health and stall checks go on", SINK_CALL_S)
                sink_silent = True
                inc, received, committed, now = incarnation, [], [], seen
            else:
                if sink_silent:
                    log.warning("the sink answers again")
                sink_silent = False
            if inc != incarnation:
                if incarnation is not None:  # the sink restarted: its uncommitted rows are gone
                    log.warning("the sink restarted; checking which tasks are committed")
                    need_recovery = True
                    earlier = earlier.plus(seen)  # the new one counts from 0 again
                incarnation, received_off, committed_off = inc, 0, 0
            seen = now
            stats = earlier.plus(now)
            received_off += len(received)
            committed_off += len(committed)
            active.difference_update(received)
            for tid in committed:
                inflight.pop(tid, None)
                active.discard(tid)
            progress.ok, progress.failed = stats.ok, stats.failed
            progress.failed_by_kind = stats.failed_by_kind
            progress.tokens = stats.tokens
            progress.in_flight = len(active)
            if received or committed:
                moved_at, stall_resent = time.monotonic(), False
            if stats.gave_up:
                raise RunAborted(stats.gave_up)
            # Bad input rows are the data's, not the workflow's (and go to the sink first): not counted.
            ran = {kind: n for kind, n in stats.failed_by_kind.items() if kind != "bad_input"}
            if stop_after_failures and not stats.ok and len(ran) == 1 and sum(ran.values()) >= stop_after_failures and not (exhausted and not inflight):
                raise AllFailing(*next(iter(ran.items())), stats.first_failure, stop_after_failures)  # not when the run ends anyway
            if stats.commit_error != commit_error:
                commit_error = stats.commit_error
                if commit_error:
                    log.warning("commits to the store are failing (%s); the sink keeps the rows and retries", commit_error)
                else:
                    log.warning("commits to the store succeed again")
            if on_progress:
                on_progress(progress)

            if (exhausted or stopping) and inflight and not active and not sink_silent:
                doing = "the sink (flush)"
                await to_sink_or_go_on(team.sink.flush.remote(), "a flush")  # the last tasks are in: no need to wait for the timer
            if (exhausted and not inflight) or (stopping and (not inflight or time.monotonic() >= stop_started + grace)):  # type: ignore[operator]
                progress.finished = exhausted and not inflight
                progress.interrupted = stopping and not progress.finished
                return progress

            if time.monotonic() >= next_health:
                next_health = time.monotonic() + health_interval_s
                doing = "the actors' health check"
                restarted, _ = await team.check()
                progress.llm_by_role = team.llm_activity()
                if len(team.dead) > dead_seen:  # what the dead held is nowhere now (dispatch may have found them first)
                    dead_seen, need_recovery = len(team.dead), True
                steps = sum(team.steps.values())
                if steps != steps_seen or commit_error or not inflight:  # a failing disk has its own limit
                    steps_seen, moved_at, stall_resent = steps, time.monotonic(), False
                elif stall_timeout_s and not stopping and time.monotonic() - moved_at > stall_timeout_s:
                    doing = "the actors (what they hold)"
                    await on_stall()
                if restarted:
                    log.warning("actor(s) restarted after a crash: %s", ", ".join(restarted))
                    need_recovery = True
                if need_recovery:
                    doing = "the actors (recovery)"
                    need_recovery = not await recover()

    # The watchdog: the loop's awaits are bounded, and this makes sure of it. It needs
    # nothing from the loop but its clock, so it runs whatever the loop waits on.
    main = asyncio.ensure_future(run_loop())
    stop_seen: float | None = None
    try:
        while True:
            done, _ = await asyncio.wait({main}, timeout=_WATCH_S)
            if done:
                return main.result()
            now_ = time.monotonic()
            if stop is not None and stop.is_set():
                stop_seen = stop_seen or now_
                if now_ > stop_seen + min(stop_grace_s, getattr(stop, "grace_s", stop_grace_s)) + _STOP_SLACK_S:
                    log.warning("stopping: the driver's loop is still waiting on %s; abandoning the tasks in flight", doing)
                    progress.interrupted, progress.in_flight = True, len(active)
                    return progress
            if stall_timeout_s and now_ - beat > max(2 * stall_timeout_s, _ROUND_S):
                raise RunAborted(
                    f"stalled: the driver waited {now_ - beat:.0f}s on {doing} (run.stall_timeout_s={stall_timeout_s:g}); "
                    f"{len(inflight)} in flight; committed work is kept, re-run to resume"
                )
    finally:
        progress.ended_at = progress.ended_at or time.monotonic()
        if not main.done():
            main.cancel()
            with contextlib.suppress(BaseException):
                await main
