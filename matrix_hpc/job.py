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

from .runtime.actor import RoleSpec, TeamSpec, load_object
from .runtime.runner import RunProgress, StopFlag, drive
from .runtime.source import SourceOptions, count_rows, iter_tasks
from .runtime.team import Team
from .runtime.usage import usage_summary
from .cluster import start_ray
from .config import JobConfig, resolve_dataset_path
from .procs import pid_alive
from .services.llm.service import LLMService
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
    usage: dict[str, Any] = field(default_factory=dict)
    """Tokens and calls ``by_role`` and ``by_model`` over every record in the store."""
    llm: list[dict[str, Any]] = field(default_factory=list)
    """The LLM endpoints at the end of the run (state, restarts, pid, log)."""

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


def _team_spec(config: JobConfig, run_id: str, namespace: str, llm_urls: list[str], registry: str | None) -> TeamSpec:
    wf, llm = config.workflow, config.llm
    roles = {
        name: RoleSpec(agent=r.agent, instances=r.instances, concurrency=r.concurrency, params={**wf.params, **r.params}, inline=r.inline)
        for name, r in wf.roles.items()
    }
    return TeamSpec(
        run_id=run_id, namespace=namespace, roles=roles, llm_urls=llm_urls, llm_model=llm.model,
        llm_api_key_env=llm.api_key_env, llm_timeout_s=llm.timeout_s, llm_max_retries=llm.max_retries,
        llm_retry_backoff_s=llm.retry_backoff_s, llm_max_connections=llm.max_connections,
        llm_max_tokens=llm.max_tokens, llm_temperature=llm.temperature,
        batch_size=config.run.batch_size, batch_wait_s=config.run.batch_wait_ms / 1000.0,
        llm_max_outstanding=llm.max_outstanding_per_endpoint, llm_sticky=llm.sticky, llm_registry=registry,
        actor_max_restarts=config.run.actor_max_restarts, agent_placement=config.run.agent_placement,
    )  # fmt: skip


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


def _slurm_env() -> dict[str, Any]:
    """The Slurm job this run is part of, if any (for status, history and resume timing)."""
    env = os.environ
    if "SLURM_JOB_ID" not in env:
        return {}
    return {"slurm_job_id": env["SLURM_JOB_ID"], "slurm_restart": int(env.get("SLURM_RESTART_COUNT", "0") or 0), "slurm_nodes": env.get("SLURM_JOB_NODELIST")}


def _write_run_info(root: Path, info: dict[str, Any]) -> None:
    atomic_write_json(root / "run.json", info, durable=False)


def run_job(
    config: JobConfig,
    on_progress: Callable[[RunProgress], None] | None = None,
    on_event: Callable[[str], None] | None = None,
    stop: StopFlag | None = None,
) -> RunSummary:
    """Run (or resume) the job in ``config``; returns when every task is committed."""
    say = on_event or (lambda msg: log.info("%s", msg))
    root = Path(config.output.path).expanduser().resolve()
    opts = _source_options(config)
    total = count_rows(opts)  # also checks that the dataset exists
    init_store(root, config.output.chunk_rows)
    _wait_for_previous_writer(root, say)
    history = list((read_json(root / "run.json", {}) or {}).get("history") or [])
    done = StoreReader(root).ids()  # read only once no other writer is left
    metrics_fn = load_object(config.workflow.metrics) if config.workflow.metrics else None
    progress = RunProgress(total=total)
    if done:
        say(f"resuming: {len(done)} task(s) already in {root}")

    run_id = uuid.uuid4().hex[:8]
    namespace = f"matrix-hpc-{run_id}"
    log_dir = root / "logs"
    log_dir.mkdir(exist_ok=True)
    info: dict[str, Any] = {
        "run_id": run_id, "status": "starting", "host": socket.gethostname(), "driver_pid": os.getpid(),
        "started_at": time.time(), "dataset": str(opts.path), "input_rows": total,
        "config_file": config.source_file, "config": config.to_dict(), "slurm": _slurm_env(),
    }  # fmt: skip
    entry: dict[str, Any] = {"run_id": run_id, **_slurm_env(), "started_at": info["started_at"], "skipped": len(done)}
    info["history"] = history + [entry]
    _write_run_info(root, info)

    cluster = start_ray(config.cluster, namespace)
    service: LLMService | None = None
    team: Team | None = None
    try:
        t0 = time.monotonic()
        service = LLMService(config.llm, run_id, namespace, log_dir)
        urls = service.start()
        say(f"{config.llm.engine} LLM endpoint(s) ready in {time.monotonic() - t0:.1f}s: {', '.join(urls)}")
        team = Team(_team_spec(config, run_id, namespace, urls, service.name), config.workflow.entry, str(root), config.output.chunk_rows, config.output.flush_interval_s, config.output.fsync)
        asyncio.run(team.start())
        info.update(status="running", ray_address=cluster.address, ray_logs=f"{cluster.session_dir}/logs", llm=service.endpoints, actors=team.pids, actor_hosts=team.hosts)
        _write_run_info(root, info)
        progress.started_at = time.monotonic()
        tasks = iter_tasks(opts, done, progress.source_counts)
        run = config.run
        asyncio.run(drive(team, tasks, progress, run.max_in_flight, run.batch_size, run.max_attempts, run.health_interval_s, on_progress, stop, run.stop_grace_s))
        asyncio.run(_close_sink(team))
        info["llm"] = _safe_status(service)
    finally:
        if team is not None:
            team.shutdown()
        if service is not None:
            service.stop()
        cluster.shutdown()

    reader = StoreReader(root)
    counts = reader.counts()
    metrics = metrics_fn(reader.iter_records()) if metrics_fn else {}
    usage = usage_summary(reader.iter_records())
    entry.update(
        first_task_at=progress.first_dispatch_at, finished_at=time.time(), dispatched=progress.dispatched, resent=progress.resent,
        committed=progress.done, status="finished" if progress.finished else "interrupted",
    )  # fmt: skip
    info.update(status="finished" if progress.finished else "interrupted", finished_at=time.time(), store=counts, metrics=metrics, usage=usage)
    _write_run_info(root, info)
    return RunSummary(output=str(root), progress=progress, store=counts, metrics=metrics, ray_logs=info.get("ray_logs"), usage=usage, llm=info.get("llm") or [])


def _safe_status(service: LLMService | None) -> list[dict[str, Any]]:
    if service is None:
        return []
    try:
        return service.status()
    except Exception as exc:  # reporting only: never fail a finished run over it
        log.warning("LLM service status unavailable: %s", exc)
        return service.endpoints


async def _close_sink(team: Team) -> None:
    await team.sink.close.remote()
