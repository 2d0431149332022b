"""One generation job, start to end: store, Ray, LLM engine, team, drive, summary.

This is what ``matrix-hpc run`` calls. Re-running the same job resumes it: ids
already committed in the output store are skipped by the source.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cluster import start_ray
from .config import JobConfig, resolve_dataset_path
from .config.checks import model_key
from .credentials import new_secret_file, remove_secret
from .metrics import prometheus_targets
from .resume import nothing_to_do, plan_resume
from .runinfo import LifeRecord, RunInfo
from .runtime.loader import check_workflow_code, import_paths, load_object
from .runtime.replay import ReplayStats
from .runtime.runner import AllFailing, RunProgress, StopFlag, drive
from .runtime.source import DatasetError, DatasetScan, SourceOptions, columns_option, iter_tasks, scan_dataset
from .runtime.spec import team_spec
from .runtime.team import Team, TeamError
from .runtime.usage import ReplaySummary, UsageSummary, replay_summary
from .services.llm.service import LLMServices
from .services.llm.status import EndpointStatus
from .store import StoreReader
from .store.call_journal import CallJournal
from .store.fsutil import atomic_write_json, read_json
from .store.layout import RunLayout
from .store.writable import check_output_writable
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
    """The workflow's metrics over every record in the store (earlier lives' included)."""
    ray_logs: str | None = None
    usage: UsageSummary = field(default_factory=UsageSummary)
    """Tokens, calls, errors and latency ``by_role`` and ``by_model`` over every record in the store."""
    llm: list[EndpointStatus] = field(default_factory=list)
    """Every model's LLM endpoints at the end of the run (state, restarts, pid, log, placement)."""
    replay: ReplaySummary | None = None
    """This life's calls answered from the call journal (None: ``run.replay`` off)."""
    journal: ReplayStats = field(default_factory=ReplayStats)
    """The agent actors' journal counters, added up: entries, flushes, bytes, write_s (write + fsync), hits."""
    failure_samples: dict[str, str] = field(default_factory=dict)
    """One message per failure kind in the store (the newest), with where it was raised."""
    agent_log: str | None = None
    """``OUTPUT/logs/agents.log``: full tracebacks of agent exceptions, when there are any."""

    @property
    def tasks_per_s(self) -> float:
        return self.progress.done / max(self.progress.elapsed_s, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.progress.tokens.completion_tokens / max(self.progress.elapsed_s, 1e-9)


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
        split=ds.split,
        columns=columns_option(ds.columns),
    )


def _check_dataset(opts: SourceOptions, say: Callable[[str], None]) -> DatasetScan:
    """The scan (rows, each row's id hash); refuses an ``id_field`` no row has, warns once about rows lacking it."""
    scan = scan_dataset(opts, ids=True)  # also checks that the dataset exists
    if opts.id_field is not None and scan.rows and scan.missing_id == scan.rows:
        raise DatasetError(
            f"dataset.id_field: no row of {opts.path} has a field {opts.id_field!r} "
            "(name the field that holds each row's id, or set dataset.id_field=null to hash every row)"
        )
    if opts.id_field is not None and scan.missing_id:
        say(f"warning: dataset.id_field: {scan.missing_id} of {scan.rows} rows have no field {opts.id_field!r}; they get content-hash ids")
    return scan


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
    path = RunLayout(root).run_json
    try:
        current = read_json(path, {}) or {}
        if not claim and current.get("run_id") not in (None, info.run_id):
            log.warning("run.json belongs to run %s now; not overwriting it with run %s", current.get("run_id"), info.run_id)
            return
        atomic_write_json(path, info.to_dict(), durable=False)
    except (OSError, ValueError) as exc:
        log.warning("cannot write %s: %s", path, exc)


def run_job(
    config: JobConfig,
    on_progress: Callable[[RunProgress], None] | None = None,
    on_event: Callable[[str], None] | None = None,
    stop: StopFlag | None = None,
    on_saved: Callable[[RunProgress], None] | None = None,
) -> RunSummary:
    """Run (or resume) the job in ``config``; returns when every task is committed.

    Shutdown order: the sink's commit of everything finished, then the agents (their
    journal stats and ``close()``, which may be slow), then the sink (which commits what
    arrived meanwhile and releases the store), then ``on_saved`` (a Slurm job requeues
    itself here, before any slow work), then the LLM services and the summaries. A run
    that cannot go on (stalled, a role gone, commits failing) saves what is finished the
    same way, then raises :class:`~matrix_hpc.runtime.team.TeamError` with one line."""
    say = on_event or (lambda msg: (log.warning if msg.startswith("warning: ") else log.info)("%s", msg))
    check_workflow_code(config)  # a typo in an agent's name fails here, before Ray or an engine starts
    root = check_output_writable(config.output.path)  # before anything starts: one clear line
    opts = _source_options(config)
    scan = _check_dataset(opts, say)
    total = scan.rows
    init_store(root, config.output.chunk_rows)
    layout = RunLayout(root)
    wait_for_previous_writer(layout.part(0).dir, say)
    prev = RunInfo.from_dict(read_json(layout.run_json, {}) or {})
    reader = StoreReader(root)
    resume = plan_resume(config, reader, say, scan)  # read only once no other writer is left
    done = resume.skip  # ids whose current record stays; resume.retry: failed ones run again
    start_mark = reader.committed()
    metrics_fn = load_object(config.workflow.metrics) if config.workflow.metrics else None
    progress = RunProgress(total=total)
    if done:
        say(f"resuming: {len(done)} task(s) already in {root}")

    run_id = uuid.uuid4().hex[:8]
    namespace = f"matrix-hpc-{run_id}"
    journal = _start_journal(CallJournal(layout.journal, run_id, config.output.fsync), done | resume.retry.keys(), say) if config.run.replay else None
    log_dir = layout.logs  # the engines' logs and agents.log
    log_dir.mkdir(exist_ok=True)
    slurm = _slurm_env()
    started = time.time()
    info = RunInfo(
        run_id=run_id, status="starting", host=socket.gethostname(), driver_pid=os.getpid(), started_at=started,
        dataset=str(opts.path), input_rows=total, config_file=config.source_file, config=config.to_dict(), slurm=slurm,
        history=[*prev.history, LifeRecord(run_id=run_id, started_at=started, skipped=len(done), **slurm)],
        store=prev.store, usage=prev.usage, summary_upto=prev.summary_upto,  # kept if this life crashes: the next one adds to them
    )  # fmt: skip
    _write_run_info(root, info, claim=True)
    # The source is read up to its first task before anything starts: a re-run of a
    # finished job (every row in the store) ends here, without Ray or an engine (~40 s).
    tasks = iter_tasks(opts, done, progress.source_counts, resume.retry, scan)
    first = next(tasks, None)
    if first is None:
        say(nothing_to_do(root, resume, config.run.retry_failed is not None))
        progress.finished = True
        try:
            if on_saved is not None:
                on_saved(progress)
            return _finish(root, info, progress, metrics_fn, journal, ReplayStats(), started, prev, start_mark)
        except BaseException as exc:
            _record_abort(root, info, exc, stopping=_asked_to_stop(stop), stop=stop)
            raise
    tasks = itertools.chain([first], tasks)

    cluster = None
    services: LLMServices | None = None
    team: Team | None = None
    aborted: TeamError | None = None
    key_file: Path | None = None
    try:  # any way out but a return records how this life ended (see _record_abort)
        try:
            key_file = new_secret_file(layout.llm_key(run_id)) if any(m.engine != "external" for m in config.models.values()) else None
            cluster = start_ray(config.cluster, namespace, import_paths(config))
            t0 = time.monotonic()
            keys = {name: model_key(config, name) for name in config.models}
            services = LLMServices(config.models, run_id, namespace, log_dir, keys, str(key_file) if key_file else None)
            services.start()
            _say_endpoints(say, config, services.endpoints, time.monotonic() - t0)
            spec = team_spec(
                config, run_id, namespace, services.client_endpoints(), str(journal.dir) if journal else None, warn=lambda msg: say(f"warning: {msg}"),
                agents_log=str(layout.agents_log), api_key_file=str(key_file) if key_file else None,
            )  # fmt: skip
            out, run = config.output, config.run
            owner = WriterOwner(run_id, socket.gethostname(), os.getpid(), start_rows=start_mark.get(layout.part(0).dir.name, 0))
            team = Team(
                spec, config.workflow.entry, str(root), out.chunk_rows, out.flush_interval_s, out.fsync,
                run.max_actor_restarts, out.commit_retry_s, owner,
            )  # fmt: skip
            asyncio.run(team.start())
            if config.run.metrics:  # for Prometheus' file_sd_configs (README: Watching a run)
                atomic_write_json(layout.prometheus_targets, prometheus_targets({"job": "matrix-hpc", "run_id": run_id}), durable=False)
            info.status, info.ray_address, info.ray_logs = "running", cluster.address, f"{cluster.session_dir}/logs"
            info.llm, info.llm_state_at, info.actors, info.actor_hosts = _safe_status(services), "start", team.pids, team.hosts
            _write_run_info(root, info)
            progress.started_at = time.monotonic()
            try:
                asyncio.run(
                    drive(
                        team,
                        tasks,
                        progress,
                        run.max_in_flight,
                        run.batch_size,
                        run.max_attempts,
                        run.health_interval_s,
                        on_progress,
                        stop,
                        run.stop_grace_s,
                        run.stall_timeout_s,
                        run.stop_after_failures,
                    )
                )
            except TeamError as exc:  # save what is finished, then say why in one line
                aborted = exc
                # The CLI prints the whole line last; this one only says why the run is stopping.
                say(f"stopping early: {exc.count} tasks failed as {exc.kind}" if isinstance(exc, AllFailing) else f"stopping: {exc}")
            # The final commit first: after a TERM the KILL may come within seconds, and the
            # clean-up below (journal stats, the agents' close()) can take much longer.
            asyncio.run(_flush_sink(team))
            if _note_stop(info, stop, progress):  # said now: the KILL may come before this life's end is written
                _write_run_info(root, info)
            journal_costs = asyncio.run(_journal_costs(team)) if journal else ReplayStats()
            asyncio.run(team.close())
            team.stop_agents()  # before the sink closes: nothing reaches it afterwards
            asyncio.run(_close_sink(team))
            team.shutdown()
            if on_saved is not None:
                on_saved(progress)
            info.llm, info.llm_state_at = _safe_status(services), "end"  # until now: their state at start
        finally:
            if team is not None:
                team.shutdown()
            if services is not None:
                services.stop()
            if cluster is not None:
                cluster.shutdown()
            remove_secret(key_file)  # its servers are gone
        _note_stop(info, stop, progress)  # again: a reading of why that came late is in the final run.json
        summary = _finish(root, info, progress, metrics_fn, journal, journal_costs, started, prev, start_mark)
        if aborted is not None:
            raise aborted
        return summary
    except BaseException as exc:
        _record_abort(root, info, exc, stopping=_asked_to_stop(stop), stop=stop)
        raise


def _asked_to_stop(stop: StopFlag | None, within_s: float | None = None) -> bool:
    """Whether this life was asked to stop, allowing ``within_s`` for the signal: a Slurm
    requeue or preemption signals every node, and the driver may see its team fall apart
    (a worker node's actors gone) before its own TERM arrives. Under Slurm that took over
    2 s on the test cluster (``scontrol requeue``: the worker's step was signalled first),
    so a Slurm life waits 10 s: either the signal comes (interrupted), or the KILL does (a
    killed life has no end fields; the next one resumes), or neither (a real failure, said late)."""
    if stop is None:
        return False
    if within_s is None:
        within_s = 10.0 if os.environ.get("SLURM_JOB_ID") else 2.0
    deadline = time.monotonic() + within_s
    while not stop.is_set() and time.monotonic() < deadline:
        time.sleep(0.05)
    return stop.is_set()


def _note_stop(info: RunInfo, stop: StopFlag | None, progress: RunProgress | None = None) -> bool:
    """Why this life was told to stop, in its history entry: ``stop_signal`` (the first signal)
    and ``ended_by`` (the flag's ``cause`` where its owner knows it: ``time_limit``, ``preempted``,
    ... on Slurm; else the signal). False (nothing noted) for a life not stopped, or finished.
    Reading why may take a call to Slurm (on a thread since the signal): it is waited for, 10 s at most."""
    if stop is None or not stop.is_set() or (progress is not None and progress.finished):
        return False
    reason = getattr(stop, "reason", None)
    settled = getattr(stop, "settled_cause", None)
    info.life.stop_signal = reason
    info.life.ended_by = (settled(10.0) if settled is not None else None) or reason
    return True


def _record_abort(root: Path, info: RunInfo, exc: BaseException, stopping: bool = False, stop: StopFlag | None = None) -> None:
    """Say how this life ended, so ``status`` does not report a dead run as running.

    A life asked to stop (USR2/TERM on Slurm: its peers' nodes are going away too, so its
    team may fall apart: a TeamError), before or just after it fails, was interrupted, not
    failed: its committed rows are durable either way, and the next life resumes from them."""
    ended = "interrupted" if stopping and not isinstance(exc, KeyboardInterrupt) else "aborted" if isinstance(exc, KeyboardInterrupt) else "failed"
    if stopping:
        _note_stop(info, stop)
    info.life.finished_at, info.life.status = time.time(), ended
    info.status, info.finished_at, info.error = ended, time.time(), f"{type(exc).__name__}: {exc}"[:500]
    _write_run_info(root, info)


def _finish(
    root: Path, info: RunInfo, progress: RunProgress, metrics_fn: Any, journal: CallJournal | None,
    journal_costs: ReplayStats, started: float, prev: RunInfo, start_mark: dict[str, int],
) -> RunSummary:  # fmt: skip
    """Totals over the store, the final run.json, and the summary. Counts and usage add
    the rows committed since the previous summary to it; the workflow's metrics are over
    the whole store (see matrix_hpc.summary); failure samples and replay figures are over
    this life's rows."""
    entry = info.life
    if journal is not None and progress.finished:  # every task is committed: nothing left to replay
        journal.remove()
    summary = summarize(root, prev.summary_upto, prev.store, prev.usage, metrics_fn)
    counts, metrics, usage = summary.store, summary.metrics, summary.usage
    reader = StoreReader(root)
    new_rows = lambda: reader.iter_records(since=start_mark, upto=summary.upto)  # noqa: E731  (this life's rows)
    samples = failure_samples(new_rows()) if counts["failed"] else {}
    agent_log = RunLayout(root).agents_log
    replay = replay_summary(new_rows(), since=started) if journal else None
    entry.replayed, info.replay = (replay.calls if replay else None), replay
    entry.first_task_at, entry.finished_at, entry.dispatched = progress.first_dispatch_at, time.time(), progress.dispatched
    entry.committed, entry.resent, entry.status = progress.done, progress.resent, "finished" if progress.finished else "interrupted"
    info.status, info.finished_at, info.store, info.metrics, info.usage = entry.status, time.time(), counts, metrics, usage
    info.summary_upto = summary.upto
    _write_run_info(root, info)
    return RunSummary(
        output=str(root), progress=progress, store=counts, metrics=metrics, ray_logs=info.ray_logs, usage=usage, llm=info.llm,
        replay=replay, journal=journal_costs, failure_samples=samples, agent_log=str(agent_log) if agent_log.is_file() else None,
    )  # fmt: skip


def failure_samples(records: Iterable[dict[str, Any]]) -> dict[str, str]:
    """The newest failed record's message per kind, with its innermost frame if it has one."""
    newest: dict[str, tuple[float, str]] = {}
    for rec in records:
        err = rec.get("error")
        if rec.get("status") != "failed" or not err:
            continue
        at = float(rec.get("finished_at") or 0)
        if err["kind"] in newest and newest[err["kind"]][0] >= at:
            continue
        text = f"{err.get('message')}" + (f" (role {err['role']})" if err.get("role") else "")
        if err.get("traceback"):
            text += f" at {err['traceback'][-1].split(': ', 1)[0]}"
        newest[err["kind"]] = (at, text)
    return {kind: text for kind, (_, text) in newest.items()}


def _say_endpoints(say: Callable[[str], None], config: JobConfig, endpoints: list[EndpointStatus], secs: float) -> None:
    """Ready means it answered a probe; the others are named with their error (the
    registry keeps probing them and routes to them once they answer)."""
    for name in config.models:
        up = [e.url for e in endpoints if e.model == name and e.state == "up"]
        if up:
            say(f"model {name} ({config.models[name].engine}): endpoint(s) ready in {secs:.1f}s: {', '.join(up)}")
    for e in endpoints:
        if e.state != "up":
            say(f"warning: model {e.model}: LLM endpoint {e.url} is not answering ({e.last_error}); it is left out of routing until it does")


def _safe_status(services: LLMServices) -> list[EndpointStatus]:
    try:
        return services.status()
    except Exception as exc:  # reporting only: never fail a finished run over it
        log.warning("LLM service status unavailable: %s", exc)
        return services.endpoints


def _start_journal(journal: CallJournal, done: Container[str], say: Callable[[str], None]) -> CallJournal:
    """The call journal at a life's start: only calls of tasks not in the store are kept."""
    start = journal.start_life(done)
    if start.files:
        say(f"replay: {start.kept} journaled LLM call(s) of unfinished tasks kept ({start.bytes_kept / 1024:.0f} KiB of {start.bytes_before / 1024:.0f} KiB)")
    return journal


async def _journal_costs(team: Team) -> ReplayStats:
    """The actors' journal counters added up (entries, flushes, bytes, seconds in write + fsync, hits)."""
    return sum(await team.replay_stats(), ReplayStats())


async def _flush_sink(team: Team, timeout_s: float = 120.0) -> None:
    """Commit what the sink holds now (the run's finished work), bounded: a sink that cannot
    answer is closed (or found gone) later, and its rows are redone by a re-run."""
    from ray.exceptions import RayError

    try:
        await asyncio.wait_for(team.sink.flush.remote(), timeout_s)
    except (TimeoutError, RayError) as exc:
        log.warning("the final commit did not finish (%s); the sink is closed next", type(exc).__name__)


async def _close_sink(team: Team, timeout_s: float = 300.0) -> None:
    from ray.exceptions import ActorDiedError

    try:
        await asyncio.wait_for(team.sink.close.remote(), timeout_s)
    except ActorDiedError:  # gone for good (the run stops saying so): what it committed stays
        log.warning("the sink is gone; its committed rows are kept, the rest is redone by a re-run")
    except TimeoutError:  # frozen: the shutdown must not wait on it forever (commits are crash-safe)
        log.warning("the sink did not close within %.0fs; its committed rows are kept, the rest is redone by a re-run", timeout_s)
