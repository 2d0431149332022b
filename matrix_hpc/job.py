"""One generation job, start to end: store, Ray, LLM engine, team, drive, summary.

This is what ``matrix-hpc run`` calls. Re-running the same job resumes it: ids
already committed in the output store are skipped by the source.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .runinfo import LifeRecord, RunInfo
from .runtime.actor import load_object
from .runtime.runner import RunProgress, StopFlag, drive
from .runtime.source import SourceOptions, count_rows, iter_tasks
from .runtime.spec import team_spec
from .runtime.team import Team
from .runtime.usage import UsageSummary, usage_summary
from .cluster import start_ray
from .config import JobConfig, resolve_dataset_path
from .config.checks import model_key
from .metrics import prometheus_targets
from .procs import pid_alive
from .services.llm.service import LLMServices
from .services.llm.status import EndpointStatus
from .store import StoreLockedError, StoreReader
from .store.fsutil import WriterLock, atomic_write_json, read_json
from .store.zarr_store import init_store

__all__ = ["RunSummary", "run_job"]

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    output: str
    progress: RunProgress
    store: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    ray_logs: str | None = None
    usage: UsageSummary = field(default_factory=UsageSummary)
    """Tokens, calls, errors and latency ``by_role`` and ``by_model`` over every record in the store."""
    llm: list[EndpointStatus] = field(default_factory=list)
    """Every model's LLM endpoints at the end of the run (state, restarts, pid, log, placement)."""

    @property
    def tasks_per_s(self) -> float:
        return self.progress.done / max(self.progress.elapsed_s, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.progress.completion_tokens / max(self.progress.elapsed_s, 1e-9)


def _source_options(config: JobConfig) -> SourceOptions:
    ds = config.dataset
    return SourceOptions(
        path=resolve_dataset_path(config),
        entry_role=config.workflow.entry,
        format=ds.format,
        id_field=ds.id_field,
        required_fields=tuple(ds.required_fields),
        max_row_bytes=ds.max_row_bytes,
        limit=ds.limit,
    )


def _wait_for_previous_writer(root: Path, say: Callable[[str], None], timeout_s: float = 60.0) -> None:
    """Refuse to share a store with a live run; wait out the writer of a crashed one.

    After a driver is SIGKILLed its sink actor lives on for a few seconds and may
    still commit finished work; the new run must read the store after it is gone.
    """
    lock = root / "part-000" / "writer.lock"
    if not WriterLock.is_held(lock):
        return
    prev = read_json(root / "run.json", {}) or {}
    pid, host = prev.get("driver_pid"), prev.get("host")
    if not (isinstance(pid, int) and host == socket.gethostname() and not pid_alive(pid)):
        raise StoreLockedError(f"{root} is being written by another run (driver pid {pid} on {host}; see {root / 'run.json'})")
    say(f"waiting for the writer of the previous, crashed run (driver pid {pid}) to exit")
    deadline = time.monotonic() + timeout_s
    while WriterLock.is_held(lock):
        if time.monotonic() > deadline:
            raise StoreLockedError(f"{root}: the crashed run's writer still holds {lock} after {timeout_s:.0f}s")
        time.sleep(0.2)


def _slurm_env() -> dict[str, Any]:  # keys as in LifeRecord
    """The Slurm job this run is part of, if any (for status, history and resume timing)."""
    env = os.environ
    if "SLURM_JOB_ID" not in env:
        return {}
    return {"slurm_job_id": env["SLURM_JOB_ID"], "slurm_restart": int(env.get("SLURM_RESTART_COUNT", "0") or 0), "slurm_nodes": env.get("SLURM_JOB_NODELIST")}


def _write_run_info(root: Path, info: RunInfo) -> None:
    atomic_write_json(root / "run.json", info.to_dict(), durable=False)


def run_job(
    config: JobConfig,
    on_progress: Callable[[RunProgress], None] | None = None,
    on_event: Callable[[str], None] | None = None,
    stop: StopFlag | None = None,
) -> RunSummary:
    """Run (or resume) the job in ``config``; returns when every task is committed."""
    say = on_event or (lambda msg: (log.warning if msg.startswith("warning: ") else log.info)("%s", msg))
    root = Path(config.output.path).expanduser().resolve()
    opts = _source_options(config)
    total = count_rows(opts)  # also checks that the dataset exists
    init_store(root, config.output.chunk_rows)
    _wait_for_previous_writer(root, say)
    history = RunInfo.from_dict(read_json(root / "run.json", {}) or {}).history
    done = StoreReader(root).ids()  # read only once no other writer is left
    metrics_fn = load_object(config.workflow.metrics) if config.workflow.metrics else None
    progress = RunProgress(total=total)
    if done:
        say(f"resuming: {len(done)} task(s) already in {root}")

    run_id = uuid.uuid4().hex[:8]
    namespace = f"matrix-hpc-{run_id}"
    log_dir = root / "logs"
    log_dir.mkdir(exist_ok=True)
    slurm = _slurm_env()
    started = time.time()
    info = RunInfo(
        run_id=run_id, status="starting", host=socket.gethostname(), driver_pid=os.getpid(), started_at=started,
        dataset=str(opts.path), input_rows=total, config_file=config.source_file, config=config.to_dict(), slurm=slurm,
        history=[*history, LifeRecord(run_id=run_id, started_at=started, skipped=len(done), **slurm)],
    )  # fmt: skip
    entry = info.life
    _write_run_info(root, info)

    cluster = start_ray(config.cluster, namespace)
    services: LLMServices | None = None
    team: Team | None = None
    try:
        t0 = time.monotonic()
        keys = {name: model_key(config, name) for name in config.models}
        services = LLMServices(config.models, run_id, namespace, log_dir, keys)
        urls = services.start()
        for name, model_urls in urls.items():
            say(f"model {name} ({config.models[name].engine}): endpoint(s) ready in {time.monotonic() - t0:.1f}s: {', '.join(model_urls)}")
        spec = team_spec(config, run_id, namespace, services.client_endpoints(), warn=lambda msg: say(f"warning: {msg}"))
        team = Team(spec, config.workflow.entry, str(root), config.output.chunk_rows, config.output.flush_interval_s, config.output.fsync)
        asyncio.run(team.start())
        if config.run.metrics:  # for Prometheus' file_sd_configs (README: Watching a run)
            atomic_write_json(root / "prometheus_targets.json", prometheus_targets({"job": "matrix-hpc", "run_id": run_id}), durable=False)
        info.status, info.ray_address, info.ray_logs = "running", cluster.address, f"{cluster.session_dir}/logs"
        info.llm, info.actors, info.actor_hosts = _safe_status(services), team.pids, team.hosts
        _write_run_info(root, info)
        progress.started_at = time.monotonic()
        tasks = iter_tasks(opts, done, progress.source_counts)
        run = config.run
        asyncio.run(drive(team, tasks, progress, run.max_in_flight, run.batch_size, run.max_attempts, run.health_interval_s, on_progress, stop, run.stop_grace_s))
        asyncio.run(_close_sink(team))
        info.llm = _safe_status(services)
    finally:
        if team is not None:
            team.shutdown()
        if services is not None:
            services.stop()
        cluster.shutdown()

    reader = StoreReader(root)
    counts = reader.counts()
    metrics = metrics_fn(reader.iter_records()) if metrics_fn else {}
    usage = usage_summary(reader.iter_records())
    entry.first_task_at, entry.finished_at, entry.dispatched = progress.first_dispatch_at, time.time(), progress.dispatched
    entry.committed, entry.resent, entry.status = progress.done, progress.resent, "finished" if progress.finished else "interrupted"
    info.status, info.finished_at, info.store, info.metrics, info.usage = entry.status, time.time(), counts, metrics, usage
    _write_run_info(root, info)
    return RunSummary(output=str(root), progress=progress, store=counts, metrics=metrics, ray_logs=info.ray_logs, usage=usage, llm=info.llm)


def _safe_status(services: LLMServices) -> list[EndpointStatus]:
    try:
        return services.status()
    except Exception as exc:  # reporting only: never fail a finished run over it
        log.warning("LLM service status unavailable: %s", exc)
        return services.endpoints


async def _close_sink(team: Team) -> None:
    await team.sink.close.remote()
