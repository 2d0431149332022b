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

from .runtime.actor import RoleSpec, TeamSpec, load_object
from .runtime.runner import RunProgress, StopFlag, drive
from .runtime.source import SourceOptions, count_rows, iter_tasks
from .runtime.team import Team, TeamError
from .runtime.usage import usage_summary
from .cluster import start_ray
from .config import JobConfig, resolve_dataset_path
from .services.llm.service import LLMService
from .store import StoreReader
from .store.fsutil import atomic_write_json, read_json
from .store.writer_check import wait_for_previous_writer
from .store.zarr_store import WriterOwner, init_store

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
    )  # fmt: skip


def _slurm_env() -> dict[str, Any]:
    """The Slurm job this run is part of, if any (for status, history and resume timing)."""
    env = os.environ
    if "SLURM_JOB_ID" not in env:
        return {}
    return {"slurm_job_id": env["SLURM_JOB_ID"], "slurm_restart": int(env.get("SLURM_RESTART_COUNT", "0") or 0), "slurm_nodes": env.get("SLURM_JOB_NODELIST")}


def _write_run_info(root: Path, info: dict[str, Any], claim: bool = False) -> None:
    """run.json is for people and ``status``: a full disk must not fail the run over it,
    and a later run's file is never overwritten by an earlier run that ends late
    (only the run's first write, ``claim``, replaces another run's file)."""
    try:
        current = read_json(root / "run.json", {}) or {}
        if not claim and current.get("run_id") not in (None, info["run_id"]):
            log.warning("run.json belongs to run %s now; not overwriting it with run %s", current.get("run_id"), info["run_id"])
            return
        atomic_write_json(root / "run.json", info, durable=False)
    except (OSError, ValueError) as exc:
        log.warning("cannot write %s: %s", root / "run.json", exc)


def _summarize(root: Path, prev: dict[str, Any], start_mark: dict[str, int], metrics_fn: Any) -> dict[str, Any]:
    """Store counts and usage, added up from the previous summary plus the rows
    committed since it (not a rescan of the whole store at every run's end), and the
    workflow's metrics over this run's new records."""
    reader = StoreReader(root)
    upto = reader.committed()
    since = prev.get("upto") if isinstance(prev.get("upto"), dict) else None
    if since is None or any(upto.get(p, 0) < n for p, n in since.items()):
        since, base_counts, base_usage = None, None, None  # no usable summary: one full read
    else:
        base_counts, base_usage = prev.get("store"), prev.get("usage")
    counts = _add_counts(base_counts, reader.counts(since))
    usage = _add_usage(base_usage, usage_summary(reader.iter_records(since=since, upto=upto)))
    metrics = metrics_fn(reader.iter_records(since=start_mark, upto=upto)) if metrics_fn else {}
    return {"upto": upto, "store": counts, "usage": usage, "metrics": metrics}


def _add_counts(base: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    if not base:
        return new
    out = {k: int(base.get(k, 0)) + int(new.get(k, 0)) for k in ("records", "ok", "failed", "prompt_tokens", "completion_tokens")}
    kinds = dict(base.get("failed_by_kind") or {})
    for kind, n in new["failed_by_kind"].items():
        kinds[kind] = kinds.get(kind, 0) + n
    out["failed_by_kind"] = dict(sorted(kinds.items(), key=lambda kv: -kv[1]))
    return out


def _add_usage(base: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    out = {section: {name: dict(c) for name, c in ((base or {}).get(section) or {}).items()} for section in ("by_role", "by_model")}
    for section, names in new.items():
        for name, c in names.items():
            acc = out[section].setdefault(name, {"prompt_tokens": 0, "completion_tokens": 0, "calls": 0})
            for k, v in c.items():
                acc[k] = acc.get(k, 0) + v
    return out


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
    prev_info = read_json(root / "run.json", {}) or {}
    history = list(prev_info.get("history") or [])
    prev_summary = prev_info.get("summary") or {}
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
    info: dict[str, Any] = {
        "run_id": run_id, "status": "starting", "host": socket.gethostname(), "driver_pid": os.getpid(),
        "started_at": time.time(), "dataset": str(opts.path), "input_rows": total,
        "config_file": config.source_file, "config": config.to_dict(), "slurm": _slurm_env(),
    }  # fmt: skip
    entry: dict[str, Any] = {"run_id": run_id, **_slurm_env(), "started_at": info["started_at"], "skipped": len(done)}
    info["history"] = history + [entry]
    info["summary"] = prev_summary  # kept if this run crashes: the next one adds to it
    _write_run_info(root, info, claim=True)

    cluster = start_ray(config.cluster, namespace)
    service: LLMService | None = None
    team: Team | None = None
    aborted: TeamError | None = None
    try:
        t0 = time.monotonic()
        service = LLMService(config.llm, run_id, namespace, log_dir)
        urls = service.start()
        say(f"{config.llm.engine} LLM endpoint(s) ready in {time.monotonic() - t0:.1f}s: {', '.join(urls)}")
        out, run = config.output, config.run
        owner = WriterOwner(run_id, socket.gethostname(), os.getpid())
        team = Team(
            _team_spec(config, run_id, namespace, urls, service.name), config.workflow.entry, str(root), out.chunk_rows,
            out.flush_interval_s, out.fsync, run.max_actor_restarts, out.commit_retry_s, owner,
        )  # fmt: skip
        asyncio.run(team.start())
        info.update(status="running", ray_address=cluster.address, ray_logs=f"{cluster.session_dir}/logs", llm=service.endpoints, actors=team.pids, actor_hosts=team.hosts)
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
        info["llm"] = _safe_status(service)
    finally:
        if team is not None:
            team.shutdown()
        if service is not None:
            service.stop()
        cluster.shutdown()

    summary = _summarize(root, prev_summary, start_mark, metrics_fn)
    counts, metrics, usage = summary["store"], summary["metrics"], summary["usage"]
    status = "finished" if progress.finished else "failed" if aborted else "interrupted"
    entry.update(
        first_task_at=progress.first_dispatch_at, finished_at=time.time(), dispatched=progress.dispatched,
        committed=progress.done, status=status, **({"error": str(aborted)} if aborted else {}),
    )  # fmt: skip
    info.update(status=status, finished_at=time.time(), store=counts, metrics=metrics, usage=usage, summary=summary)
    _write_run_info(root, info)
    if aborted is not None:
        raise aborted
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
    try:
        stats = await team.sink.close.remote()
    except RayError as exc:  # a dead sink committed nothing more: the re-run redoes its rows
        log.warning("the sink could not be closed: %s", exc)
        return
    if stats.commit_error:
        log.warning("the last commit failed (%s): its rows are redone by the next run", stats.commit_error)
