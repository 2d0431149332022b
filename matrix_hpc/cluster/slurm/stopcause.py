"""Why Slurm stopped a life: its time limit, a preemption, a requeue or a cancel.

Slurm sends the same signals for different reasons: USR2 comes ``--signal=USR2@N`` before
the time limit and on a preemption (``preempt_send_user_signal``); TERM comes from
``scancel``, ``scontrol requeue``, the time limit itself and the end of a preemption's
GraceTime. What the signal cannot tell, the job's record in slurmctld can, read with
``scontrol show job`` as the first signal arrives (checked on Slurm 22.05):

==============  ==================  ===========================================================
``ended_by``    the signal          ``scontrol show job`` at that moment
==============  ==================  ===========================================================
``preempted``   USR2, or TERM       ``PreemptTime`` set (the job was picked for preemption)
``requeued``    TERM                ``Restarts`` above this life's ``SLURM_RESTART_COUNT``
                                    (``scontrol requeue`` by a person or a script)
``time_limit``  USR2, or TERM       ``EndTime`` within N + 90 s (Slurm may signal up to 60 s
                                    early and checks limits every 30 s); when the job is no
                                    longer RUNNING, the end time read at the life's start
``cancelled``   TERM                none of the above, the job no longer RUNNING (``scancel``)
the signal      anything else       ``SIGUSR2``, ``SIGTERM``, ``SIGINT`` (e.g. ``scancel -s``)
==============  ==================  ===========================================================

submitit tells a timeout from a preemption for the same reason (its ``SignalHandler``
counts a USR2 as a timeout when the job has run most of its time limit); the job's record
says it without a guess, so a preemption late in a job is not taken for its time limit.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time

__all__ = ["StopCause", "classify", "job_record", "slurm_time"]

log = logging.getLogger(__name__)

SLACK_S = 90.0
"""Slurm may send ``--signal`` up to 60 s early, and checks time limits every ~30 s."""


def job_record(job_id: str, timeout_s: float = 8.0) -> dict[str, str] | None:
    """``scontrol -o show job JOB`` as a dict; None where it cannot be read (said in the log)."""
    if not shutil.which("scontrol"):
        return None
    try:
        res = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("scontrol show job %s: %s", job_id, exc)
        return None
    if res.returncode != 0:  # slurmctld busy or unreachable: why this life stops stays the signal's name
        log.warning("scontrol show job %s: %s", job_id, res.stderr.strip())
    fields = dict(kv.split("=", 1) for kv in res.stdout.split() if "=" in kv)
    return fields or None


def slurm_time(value: str | None) -> float | None:
    """A Slurm timestamp (``2026-12-06T16:51:25``, local time) as epoch seconds; None for ``None``/``Unknown``."""
    if not value or not value[:1].isdigit():
        return None
    try:
        return time.mktime(time.strptime(value, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def classify(signal_name: str, job: dict[str, str] | None, restart: int, now: float, lead_s: float, end_at_start: float | None = None) -> str:
    """What ended a life (the table above): ``job`` is the record read as the first signal,
    ``restart`` this life's ``SLURM_RESTART_COUNT``, ``now`` the signal's time, ``lead_s`` the
    ``--signal`` lead, ``end_at_start`` the job's end time read when this life started."""
    if job is None:
        return signal_name
    if slurm_time(job.get("PreemptTime")) is not None:
        return "preempted"
    restarts = job.get("Restarts", "")
    if restarts.isdigit() and int(restarts) > restart:
        return "requeued"
    running = job.get("JobState") == "RUNNING"
    end = slurm_time(job.get("EndTime")) if running else end_at_start
    if end is not None and end - now <= lead_s + SLACK_S:
        return "time_limit"
    if not running and signal_name == "SIGTERM":
        return "cancelled"
    return signal_name


class StopCause:
    """Reads the job's end time at a life's start; called with the first signal's name, says
    why the life is stopping. Outside Slurm (or without ``scontrol``) it is the signal's name."""

    def __init__(self, lead_s: float) -> None:
        self.job_id = os.environ.get("SLURM_JOB_ID")
        self.restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        self.lead_s = lead_s
        start = job_record(self.job_id) if self.job_id else None
        self.end_at_start = slurm_time(start.get("EndTime")) if start else None

    def __call__(self, signal_name: str) -> str:
        now = time.time()
        job = job_record(self.job_id) if self.job_id else None
        cause = classify(signal_name, job, self.restart, now, self.lead_s, self.end_at_start)
        seen = {k: (job or {}).get(k) for k in ("JobState", "EndTime", "PreemptTime", "Restarts")}
        log.info("%s: this life ends by %s (restart %d, end at start %s, job %s)", signal_name, cause, self.restart, self.end_at_start, seen)
        return cause
