"""The one meaning of INT, TERM and USR2 (matrix_hpc/stopsignals.py), with real signals sent
to a real subprocess that holds a :class:`StopSignals`, and why a Slurm life stopped
(matrix_hpc/cluster/slurm/stopcause.py) from the job records slurmctld gave in each case."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from matrix_hpc.cluster.slurm.stopcause import classify, slurm_time
from matrix_hpc.runinfo import LifeRecord, RunInfo

from .conftest import REPO

# The child reports its flag after each signal (one JSON line per "?" on stdin) and exits 130
# on KeyboardInterrupt, as the CLI does.
CHILD = r"""
import json, signal, sys, time
from matrix_hpc.stopsignals import StopSignals, handlers_kept
serving = sys.argv[1] == "serving"
s = StopSignals(notify=lambda m: print("NOTICE " + m, flush=True), grace_s=30, serving=serving,
                on_first=lambda name: setattr(s, "cause", "because-" + name))
if sys.argv[2] == "ray":  # what ray.init does: a SIGTERM handler that exits at once
    import ray._private.utils
    with handlers_kept():
        ray._private.utils.set_sigterm_handler(lambda signum, frame: sys.exit(signum))
print("READY", flush=True)
try:
    for line in sys.stdin:
        print(json.dumps({"set": s.is_set(), "reason": s.reason, "seen": s.seen, "grace": str(s.grace_s),
                          "terminating": s.terminating, "cause": s.settled_cause(5)}), flush=True)
except KeyboardInterrupt:
    print("ABORTED", flush=True)
    sys.exit(130)
"""


class Child:
    def __init__(self, serving: bool = False, ray: bool = False) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, "serving" if serving else "run", "ray" if ray else "-"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        )  # fmt: skip
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.notices: list[str] = []
        assert self._line() == "READY"

    def _line(self) -> str:
        line = self.proc.stdout.readline().strip()  # type: ignore[union-attr]
        while line.startswith("NOTICE "):
            self.notices.append(line[len("NOTICE ") :])
            line = self.proc.stdout.readline().strip()  # type: ignore[union-attr]
        return line

    def state(self) -> dict[str, Any]:
        self.proc.stdin.write("?\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        line = self._line()
        return json.loads(line) if line.startswith("{") else {"line": line}

    def wait_state(self, pred: Any, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            st = self.state()
            if pred(st) or time.monotonic() > deadline:
                return st
            time.sleep(0.1)

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(30)


@pytest.fixture
def child() -> Any:
    made: list[Child] = []

    def make(**kw: Any) -> Child:
        made.append(Child(**kw))
        return made[-1]

    yield make
    for c in made:
        c.close()


def test_first_ctrl_c_stops_with_grace_and_the_second_aborts(child: Any) -> None:
    c = child()
    os.kill(c.proc.pid, signal.SIGINT)
    st = c.wait_state(lambda s: s["set"])
    assert st["reason"] == "SIGINT" and st["grace"] == "inf" and not st["terminating"], st
    assert st["cause"] == "because-SIGINT"  # on_first ran, on a thread of its own
    assert c.notices == ["SIGINT: stopping intake; tasks in flight get up to 30s, finished work is saved (again to abort)"]
    os.kill(c.proc.pid, signal.SIGINT)
    assert c._line() == "ABORTED" and c.proc.wait(30) == 130


def test_term_stops_with_no_grace_and_never_aborts(child: Any) -> None:
    c = child()
    os.kill(c.proc.pid, signal.SIGTERM)
    st = c.wait_state(lambda s: s["set"])
    assert st["reason"] == "SIGTERM" and st["grace"] == "0.0" and st["terminating"], st
    for n in (2, 3):  # Slurm and srun may each deliver one: still a stop, never an abort
        os.kill(c.proc.pid, signal.SIGTERM)  # one at a time: signals of one kind are not queued
        st = c.wait_state(lambda s, n=n: len(s["seen"]) == n)
    assert st["seen"] == ["SIGTERM"] * 3 and c.proc.poll() is None, st
    assert c.notices == ["SIGTERM: stopping intake; tasks in flight are abandoned (the KILL is near), finished work is saved"]


def test_usr2_stops_with_grace_and_a_later_term_cuts_it_to_zero(child: Any) -> None:
    c = child()
    os.kill(c.proc.pid, signal.SIGUSR2)
    st = c.wait_state(lambda s: s["set"])
    assert st["reason"] == "SIGUSR2" and st["grace"] == "inf" and not st["terminating"], st
    os.kill(c.proc.pid, signal.SIGTERM)
    st = c.wait_state(lambda s: s["terminating"])
    assert st["reason"] == "SIGUSR2" and st["grace"] == "0.0" and st["seen"] == ["SIGUSR2", "SIGTERM"], st
    assert c.notices == [
        "SIGUSR2: stopping intake; tasks in flight get up to 30s, finished work is saved",
        "SIGTERM: tasks in flight are abandoned now, finished work is saved",
    ]


def test_a_server_keeps_serving_on_usr2_and_stops_on_term(child: Any) -> None:
    c = child(serving=True)
    os.kill(c.proc.pid, signal.SIGUSR2)  # the default action would end the process
    time.sleep(0.5)
    st = c.state()
    assert not st["set"] and c.proc.poll() is None, st
    os.kill(c.proc.pid, signal.SIGTERM)
    st = c.wait_state(lambda s: s["set"])
    assert st["reason"] == "SIGTERM" and c.notices == [], st


def test_handlers_survive_the_sigterm_handler_ray_init_installs(child: Any) -> None:
    """ray.init sets a SIGTERM handler that exits at once; the Slurm bootstrap's rank 0 called it
    (waiting for the nodes) after its own handlers were set, so a TERM ended the driver with
    nothing saved. Inside ``handlers_kept`` the process's own handler stays."""
    c = child(ray=True)
    os.kill(c.proc.pid, signal.SIGTERM)
    st = c.wait_state(lambda s: s.get("set"))
    assert st.get("reason") == "SIGTERM" and c.proc.poll() is None, st


# --- why a Slurm life stopped: the records `scontrol -o show job` gave on Slurm 22.05 ----------

LEAD = 120.0


def rec(**kw: str) -> dict[str, str]:
    base = {"JobState": "RUNNING", "PreemptTime": "None", "Restarts": "1", "StartTime": "2026-12-06T16:51:25", "EndTime": "2026-12-06T17:01:25"}
    return {**base, **kw}


def at(stamp: str, plus_s: float = 0.0) -> float:
    t = slurm_time(stamp)
    assert t is not None
    return t + plus_s


def test_a_preemption_is_told_from_the_time_limit() -> None:
    # Preempted (GraceTime 30): USR2 at 16:50:49 with PreemptTime set and EndTime cut to now + 30 s,
    # which alone would look like a time limit.
    preempted = rec(PreemptTime="2026-12-06T16:50:49", EndTime="2026-12-06T16:51:19", Restarts="0")
    assert classify("SIGUSR2", preempted, 0, at("2026-12-06T16:50:49"), LEAD) == "preempted"
    # The time limit: USR2 (--signal=USR2@120) 102 s before EndTime, no PreemptTime.
    near = rec(EndTime="2026-12-06T16:53:25")
    assert classify("SIGUSR2", near, 1, at("2026-12-06T16:51:43"), LEAD) == "time_limit"
    # Slurm may send it up to 60 s early, and checks every 30 s: still the time limit.
    assert classify("SIGUSR2", near, 1, at("2026-12-06T16:53:25", -200), LEAD) == "time_limit"
    # A USR2 long before the time limit that is no preemption: `scancel -s USR2`.
    assert classify("SIGUSR2", rec(), 1, at("2026-12-06T16:52:00"), LEAD) == "SIGUSR2"


def test_a_requeue_and_a_cancel_are_told_from_the_time_limit() -> None:
    # `scontrol requeue`: TERM with the job COMPLETING, Restarts already one above this life's.
    requeued = rec(JobState="COMPLETING", Restarts="2", StartTime="2026-12-06T16:51:46", EndTime="2026-12-06T16:53:46")
    assert classify("SIGTERM", requeued, 1, at("2026-12-06T16:51:46"), LEAD) == "requeued"
    # scancel: TERM, COMPLETING, same Restarts, EndTime set to now: the end read at the life's start decides.
    cancelled = rec(JobState="COMPLETING", Restarts="2", EndTime="2026-12-06T16:52:06")
    assert classify("SIGTERM", cancelled, 2, at("2026-12-06T16:52:06"), LEAD, end_at_start=at("2026-12-06T16:53:59", 3600)) == "cancelled"
    # The TERM of the time limit itself (no --signal): the job no longer RUNNING, its end now.
    assert classify("SIGTERM", cancelled, 2, at("2026-12-06T16:52:06"), LEAD, end_at_start=at("2026-12-06T16:52:06")) == "time_limit"
    # Outside Slurm, or no scontrol: the signal.
    assert classify("SIGINT", None, 0, time.time(), LEAD) == "SIGINT"


def test_run_json_counts_lives_by_why_they_stopped(tmp_path: Path) -> None:
    from matrix_hpc.cli import _lives_line

    lives = [
        LifeRecord(run_id="a", started_at=1.0, status="interrupted", stop_signal="SIGUSR2", ended_by="preempted"),
        LifeRecord(run_id="b", started_at=2.0, status="interrupted", stop_signal="SIGUSR2", ended_by="time_limit"),
        LifeRecord(run_id="c", started_at=3.0, status="interrupted", stop_signal="SIGUSR2", ended_by="time_limit"),
        LifeRecord(run_id="d", started_at=4.0, status="finished"),
    ]
    info = RunInfo(run_id="d", status="finished", host="h", driver_pid=1, started_at=4.0, history=lives)
    data = json.loads(json.dumps(info.to_dict()))
    assert data["interruptions"] == {"preempted": 1, "time_limit": 2}
    assert [h.get("ended_by") for h in data["history"]] == ["preempted", "time_limit", "time_limit", None]
    back = RunInfo.from_dict(data)
    assert back.interruptions == {"preempted": 1, "time_limit": 2} and back.history[0].stop_signal == "SIGUSR2"
    assert _lives_line(back) == "4 (stopped by: 1 preempted, 2 time limit)"
