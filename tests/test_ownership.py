"""The driver's side of task ownership (runtime/ownership.py), without a team: the ledger,
the sink follower and the stall clock."""

from __future__ import annotations

import json

from matrix_hpc.runtime.ownership import Ledger, SinkFollower, StallClock
from matrix_hpc.runtime.sink import SinkStats
from matrix_hpc.runtime.task import Task


def _tasks(n: int) -> list[Task]:
    return [Task(id=f"t{i}", row={"id": f"t{i}"}, next_role="a") for i in range(n)]


def test_ledger_frees_a_slot_on_receipt_and_forgets_a_task_on_commit() -> None:
    ledger = Ledger(max_attempts=3)
    for t in _tasks(4):
        ledger.take(t)
    assert len(ledger) == 4 and ledger.active == {"t0", "t1", "t2", "t3"}
    ledger.received(["t0", "t1"])  # the sink has them: backpressure slots free, still not durable
    assert len(ledger) == 4 and ledger.active == {"t2", "t3"}
    ledger.committed(["t0", "t2"])
    assert sorted(ledger.inflight) == ["t1", "t3"] and ledger.active == {"t3"}
    # Lost is what no actor holds; how many each holds names the holders of a stall.
    assert ledger.lost({"t3"}) == ["t1"]
    assert ledger.holders({"a/0": ["t3", "t9"], "a/1": []}) == {"a/0": 1, "a/1": 0}


def test_ledger_resends_a_lost_task_until_max_attempts_then_records_it_lost() -> None:
    ledger = Ledger(max_attempts=2)
    bad = Task(id="bad", row={"id": "bad"}, next_role=None)
    bad.fail("bad_input", "row bad: not JSON", role="source")
    for t in [*_tasks(1), bad]:
        ledger.take(t)
    ledger.received(["t0", "bad"])
    again, gave_up = ledger.plan_resend(["t0", "bad"], "entry")
    assert [(t.id, t.attempt, t.next_role) for t in again] == [("t0", 2, "entry")]
    assert "t0" in ledger.active  # counted in flight again
    assert [(r.id, r.status, r.error_kind) for r in gave_up] == [("bad", "failed", "bad_input")]  # its own record, not a retry
    again, gave_up = ledger.plan_resend(["t0"], "entry")  # lost a second time: attempts used up
    assert again == [] and [(r.id, r.error_kind) for r in gave_up] == [("t0", "lost")]
    assert "lost with a crashed actor 2 times" in json.loads(gave_up[0].record)["error"]["message"]


def test_sink_follower_adds_up_a_restarted_sinks_counts_and_reads_its_logs_from_zero() -> None:
    sink = SinkFollower()
    assert sink.update("inc1", ["t0", "t1"], ["t0"], SinkStats(ok=1, rows=1)) is False
    assert (sink.received_off, sink.committed_off, sink.stats.ok) == (2, 1, 1)
    assert sink.update("inc1", ["t2"], ["t1", "t2"], SinkStats(ok=2, failed=1, failed_by_kind={"x": 1}, rows=3)) is False
    assert (sink.received_off, sink.committed_off) == (3, 3)
    # A restarted sink counts from zero: the earlier incarnation's totals are kept, its offsets are not.
    assert sink.update("inc2", ["t3"], [], SinkStats(ok=1, rows=3, start_rows=3)) is True
    assert (sink.received_off, sink.committed_off) == (1, 0)
    assert (sink.stats.ok, sink.stats.failed, sink.stats.failed_by_kind) == (3, 1, {"x": 1})
    assert sink.untallied is None  # it had reported every row it committed


def test_sink_follower_counts_rows_a_killed_sink_committed_after_its_last_poll() -> None:
    # A CI run counted 3139 of 6040 committed tasks after two sink kills: what each dead sink
    # committed between the driver's last poll and its death was in no poll's stats.
    sink = SinkFollower()
    sink.update("inc1", [], ["t0"], SinkStats(ok=10, rows=10, start_rows=0))
    sink.update("inc2", [], [], SinkStats(ok=0, rows=25, start_rows=25))  # rows 10:25 went unreported
    assert sink.untallied == (10, 25) and sink.stats.ok == 10
    sink.update("inc3", [], [], SinkStats(rows=30, start_rows=30))  # killed again before the count came
    assert sink.untallied == (10, 30)
    sink.tallied(SinkStats(ok=18, failed=2, failed_by_kind={"agent_error": 2}))
    sink.update("inc3", [], [], SinkStats(ok=4, rows=34, start_rows=30))
    assert sink.untallied is None and (sink.stats.ok, sink.stats.failed, sink.stats.failed_by_kind) == (32, 2, {"agent_error": 2})


def test_stall_clock_stalls_only_when_no_step_and_no_commit_for_the_timeout() -> None:
    clock = StallClock(timeout_s=10.0, moved_at=0.0)
    assert not clock.check(steps=5, exempt=False, now=1.0)  # first count: movement
    assert not clock.check(steps=5, exempt=False, now=10.5)  # within the timeout of the last move
    assert clock.check(steps=5, exempt=False, now=11.5)
    assert not clock.check(steps=5, exempt=True, now=12.0)  # commits failing or nothing in flight: not a stall
    clock.moved(13.0)  # a receipt or a commit
    assert not clock.check(steps=5, exempt=False, now=22.0) and clock.check(steps=5, exempt=False, now=23.5)
    clock.remedy(24.0)  # the first remedy restarts the clock and is remembered
    assert clock.remedy_tried and not clock.check(steps=5, exempt=False, now=30.0)
    assert not clock.check(steps=6, exempt=False, now=40.0) and not clock.remedy_tried  # a step: the remedy worked
    assert not StallClock(timeout_s=0.0, moved_at=0.0).check(steps=0, exempt=False, now=1e9)  # 0: off
