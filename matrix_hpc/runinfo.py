"""What ``run.json`` holds: the run now, its LLM endpoints, its accounting, and every life before.

A run's output folder may see many lives (resumes, Slurm requeues); each adds a
:class:`LifeRecord` to :attr:`RunInfo.history`. The driver writes the file; the
CLI and tests read it back through :meth:`RunInfo.from_dict`, never by ad-hoc keys.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .runtime.usage import ReplaySummary, UsageSummary
from .services.llm.status import EndpointStatus

__all__ = ["LifeRecord", "RunInfo"]


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass
class LifeRecord:
    """One life of the run (a start to its end); fields unknown yet are left out of the file."""

    run_id: str
    started_at: float
    skipped: int = 0
    """Tasks already in the store when this life started."""
    slurm_job_id: str | None = None
    slurm_restart: int | None = None
    slurm_nodes: str | None = None
    first_task_at: float | None = None
    finished_at: float | None = None
    dispatched: int | None = None
    """New tasks this life sent (a resumed life skips what the store has: this counts redone work)."""
    committed: int | None = None
    resent: int | None = None
    """Tasks re-sent after the actor holding them died (with its node, say): redone work."""
    status: str | None = None
    error: str | None = None
    """Why a ``failed`` life stopped (stalled, a role gone, commits failing)."""
    replayed: int | None = None
    """LLM calls this life answered from the call journal (``run.replay``)."""
    stop_signal: str | None = None
    """The first stop signal this life got (``SIGINT``, ``SIGTERM``, ``SIGUSR2``; matrix_hpc/stopsignals.py)."""
    ended_by: str | None = None
    """Why it was told to stop: on Slurm ``time_limit``, ``preempted``, ``requeued`` or ``cancelled``
    (cluster/slurm/stopcause.py), else the signal's name."""

    def to_dict(self) -> dict[str, Any]:
        # A life killed before it ended has no end fields at all (readers test for the key).
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LifeRecord:
        return cls(**_known(cls, data))


@dataclass
class RunInfo:
    run_id: str
    status: str
    """``starting``, ``running``, ``finished``, ``interrupted``, ``aborted`` (a second Ctrl-C) or
    ``failed`` (an error ended it); a killed driver leaves ``running`` (see :mod:`.run_state`)."""
    host: str
    driver_pid: int
    started_at: float
    dataset: str | None = None
    input_rows: int | None = None
    config_file: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    """The job spec as loaded (it loads back; API keys are never in it, only their variables' names)."""
    slurm: dict[str, Any] = field(default_factory=dict)
    history: list[LifeRecord] = field(default_factory=list)
    ray_address: str | None = None
    ray_logs: str | None = None
    llm: list[EndpointStatus] = field(default_factory=list)
    """Every model's endpoints: state, restarts, process, placement (host, GPUs)."""
    llm_state_at: str | None = None
    """When ``llm`` was taken: ``start`` (the run's start) or ``end`` (the end of the run)."""
    error: str | None = None
    """What ended a ``failed`` or ``aborted`` life."""
    actors: dict[str, int] = field(default_factory=dict)
    actor_hosts: dict[str, str] = field(default_factory=dict)
    finished_at: float | None = None
    store: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    """The workflow's metrics over every record in the store when this life ended."""
    usage: UsageSummary = field(default_factory=UsageSummary)
    """Tokens, calls, errors and latency per role and per model over every record in the store."""
    summary_upto: dict[str, int] = field(default_factory=dict)
    """Committed rows per part that ``store`` and ``usage`` cover: the next life adds only newer rows."""
    replay: ReplaySummary | None = None
    """What the last life that ended replayed from the call journal (None: ``run.replay`` off)."""

    @property
    def interruptions(self) -> dict[str, int]:
        """Lives told to stop, counted by why (``time_limit``, ``preempted``, ...; see :class:`LifeRecord`)."""
        return dict(Counter(h.ended_by for h in self.history if h.ended_by))

    @property
    def life(self) -> LifeRecord:
        """This life's entry in the history."""
        return self.history[-1]

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["history"] = [h.to_dict() for h in self.history]
        data["llm"] = [e.to_dict() for e in self.llm]
        data["usage"] = self.usage.to_dict()
        data["replay"] = self.replay.to_dict() if self.replay else None
        data["interruptions"] = self.interruptions  # derived from history, for people and scripts
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunInfo:
        """From run.json (keys of other versions are ignored)."""
        kw = _known(cls, data)
        kw["history"] = [LifeRecord.from_dict(h) for h in data.get("history") or []]
        kw["llm"] = [EndpointStatus.from_dict(e) for e in data.get("llm") or []]
        kw["usage"] = UsageSummary.from_dict(data.get("usage"))
        kw["replay"] = ReplaySummary.from_dict(data["replay"]) if data.get("replay") else None
        for name, default in (("run_id", ""), ("status", "unknown"), ("host", ""), ("driver_pid", 0), ("started_at", 0.0)):
            kw.setdefault(name, default)
        return cls(**kw)
