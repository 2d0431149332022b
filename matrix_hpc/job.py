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

from ray.exceptions import RayError

from .runinfo import LifeRecord, RunInfo
from .runtime.actor import load_object
from .runtime.runner import RunProgress, StopFlag, drive
from .runtime.source import SourceOptions, count_rows, iter_tasks
from .runtime.spec import team_spec
from .runtime.team import Team, TeamError
from .runtime.usage import UsageSummary
from .cluster import start_ray
from .config import JobConfig, resolve_dataset_path
from .config.checks import model_key
from .services.llm.service import LLMServices
from .services.llm.status import EndpointStatus
from .store import StoreReader
from .store.fsutil import atomic_write_json, read_json
from .store.writer_check import wait_for_previous_writer
from .store.zarr_store import WriterOwner, init_store
from .summary import summarize

__all__ = ["RunSummary", "run_job"]

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    output: str
    progress: RunProgress
    store: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    """The workflow's metrics over the records this run committed."""
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


def _slurm_env() -> dict[str, Any]:  # keys as in LifeRecord
    """The Slurm job this run is part of, if any (for status, history and resume timing)."""
    env = os.environ
    if "SLURM_JOB_ID" not in env:
        return {}
    return {"slurm_job_id": env["SLURM_JOB_ID"], "slurm_restart": int(env.get("SLURM_RESTART_COUNT", "0") or 0), "slurm_nodes": env.get("SLURM_JOB_NODELIST")}


def _write_run_info(root: Path, info: RunInfo, claim: bool = False) -> None:
    """run.json is for people and ``status``: a full disk must not fail the run over it,
    and a later run's file is never overwritten by an earlier run that ends late
    (only a run's first write, ``claim``, replaces another run's file)."""
    try:
        current = read_json(root / "run.json", {}) or {}
        if not claim and current.get("run_id") not in (None, info.run_id):
            log.warning("run.json belongs to run %s now; not overwriting it with run %s", current.get("run_id"), info.run_id)
            return
        atomic_write_json(root / "run.json", info.to_dict(), durable=False)
    except (OSError, ValueError) as exc:
        log.warning("cannot write %s: %s", root / "run.json", exc)


def run_job(
    config: JobConfig,
    on_progress: Callable[[RunProgress], None] | None = None,
    on_event: Callable[[str], None] | None = None,
    stop: StopFlag | None = None,
    on_saved: Callable[[RunProgress], None] | None = None,
) -> RunSummary:
    """Run (or resume) the job in ``config``; returns when every task is committed.

    Shutdown order: agents, then the sink (which commits and releases the store),
    then ``on_saved`` (a Slurm job requeues itself here, before any slow work), then
    the LLM services and the summaries. A run that cannot go on (stalled, a role
    gone, commits failing) saves what is finished the same way, then raises
    :class:`~matrix_hpc.runtime.team.TeamError` with one line."""
    say = on_event or (lambda msg: log.info("%s", msg))
    root = Path(config.output.path).expanduser().resolve()
    opts = _source_options(config)
    total = count_rows(opts)  # also checks that the dataset exists
    init_store(root, config.output.chunk_rows)
    wait_for_previous_writer(root / "part-000", say)
    prev = RunInfo.from_dict(read_json(root / "run.json", {}) or {})
    reader = StoreReader(root)
    done = reader.ids()  # read only once no other writer is left
    start_mark = reader.committed()
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
        history=[*prev.history, LifeRecord(run_id=run_id, started_at=started, skipped=len(done), **slurm)],
        store=prev.store, usage=prev.usage, summary_upto=prev.summary_upto,  # kept if this life crashes: the next one adds to them
    )  # fmt: skip
    entry = info.life
    _write_run_info(root, info, claim=True)

    cluster = start_ray(config.cluster, namespace)
    services: LLMServices | None = None
    team: Team | None = None
    aborted: TeamError | None = None
    try:
        t0 = time.monotonic()
        keys = {name: model_key(config, name) for name in config.models}
        services = LLMServices(config.models, run_id, namespace, log_dir, keys)
        urls = services.start()
        for name, model_urls in urls.items():
            say(f"model {name} ({config.models[name].engine}): endpoint(s) ready in {time.monotonic() - t0:.1f}s: {', '.join(model_urls)}")
        spec = team_spec(config, run_id, namespace, services.client_endpoints())
        out, run = config.output, config.run
        owner = WriterOwner(run_id, socket.gethostname(), os.getpid())
        team = Team(
            spec, config.workflow.entry, str(root), out.chunk_rows, out.flush_interval_s, out.fsync,
            run.max_actor_restarts, out.commit_retry_s, owner,
        )  # fmt: skip
        asyncio.run(team.start())
        info.status, info.ray_address, info.ray_logs = "running", cluster.address, f"{cluster.session_dir}/logs"
        info.llm, info.actors, info.actor_hosts = _safe_status(services), team.pids, team.hosts
        _write_run_info(root, info)
        progress.started_at = time.monotonic()
        tasks = iter_tasks(opts, done, progress.source_counts)
        try:
            asyncio.run(drive(team, tasks, progress, run.max_in_flight, run.batch_size, run.max_attempts, run.health_interval_s, on_progress, stop, run.stop_grace_s, run.stall_timeout_s))
        except TeamError as exc:  # save what is finished, then say why in one line
            aborted = exc
            say(f"stopping: {exc}")
        team.stop_agents()  # first: nothing reaches the sink once it has closed
        asyncio.run(_close_sink(team))
        team.shutdown()
        if on_saved is not None:
            on_saved(progress)
        info.llm = _safe_status(services)
    finally:
        if team is not None:
            team.shutdown()
        if services is not None:
            services.stop()
        cluster.shutdown()

    summary = summarize(root, prev.summary_upto, prev.store, prev.usage, start_mark, metrics_fn)
    counts, metrics, usage = summary.store, summary.metrics, summary.usage
    entry.first_task_at, entry.finished_at, entry.dispatched = progress.first_dispatch_at, time.time(), progress.dispatched
    entry.committed, entry.status = progress.done, "finished" if progress.finished else "failed" if aborted else "interrupted"
    entry.error = str(aborted) if aborted else None
    info.status, info.finished_at, info.store, info.metrics, info.usage = entry.status, time.time(), counts, metrics, usage
    info.summary_upto = summary.upto
    _write_run_info(root, info)
    if aborted is not None:
        raise aborted
    return RunSummary(output=str(root), progress=progress, store=counts, metrics=metrics, ray_logs=info.ray_logs, usage=usage, llm=info.llm)


def _safe_status(services: LLMServices) -> list[EndpointStatus]:
    try:
        return services.status()
    except Exception as exc:  # reporting only: never fail a finished run over it
        log.warning("LLM service status unavailable: %s", exc)
        return services.endpoints


async def _close_sink(team: Team) -> None:
    try:
        stats = await team.sink.close.remote()
    except RayError as exc:  # a dead sink commits nothing more: the re-run redoes its rows
        log.warning("the sink could not be closed: %s", exc)
        return
    if stats.commit_error:
        log.warning("the last commit failed (%s): its rows are redone by the next run", stats.commit_error)
