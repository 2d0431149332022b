"""``matrix-hpc``: run a workflow, inspect and export its output.

The CLI owns everything printed; errors a user can fix print one line and exit
non-zero (2 for a bad config, 1 otherwise).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

__all__ = ["main"]

log = logging.getLogger(__name__)


def _print_summary(summary: Any) -> None:
    p = summary.progress
    out = sys.stdout
    state = "finished" if p.finished else "INTERRUPTED (re-run the same command to resume)"
    out.write(f"\nrun {state} in {p.elapsed_s:.1f}s\n")
    out.write(f"  this run:  {p.ok} done, {p.failed} failed, {p.skipped} skipped (already in the store)")
    out.write(f", {p.resent} re-sent after crashes\n" if p.resent else "\n")
    for kind, n in sorted(p.failed_by_kind.items(), key=lambda kv: -kv[1]):
        out.write(f"    failed: {kind}: {n}\n")
    out.write(f"  speed:     {summary.tasks_per_s:.2f} tasks/s, {summary.tokens_per_s:.0f} output tok/s\n")
    out.write(f"  tokens:    {p.prompt_tokens} prompt + {p.completion_tokens} completion\n")
    _print_usage(summary.usage, out.write)
    for e in summary.llm:
        if e.restarts:
            out.write(f"  llm:       model {e.model}: {e.url} was restarted {e.restarts} time(s); now {e.state}\n")
    s = summary.store
    out.write(f"  store:     {s['records']} records ({s['ok']} ok, {s['failed']} failed)\n")
    if summary.metrics:
        out.write("  metrics:   " + ", ".join(f"{k}={v}" for k, v in summary.metrics.items()) + "\n")
    if summary.ray_logs and (p.failed_by_kind.get("agent_error") or p.resent):
        out.write(f"  actor logs: {summary.ray_logs}\n")
    out.write(f"output: {summary.output}\n")


def _print_usage(usage: Any, write: Any) -> None:
    """LLM accounting per role and per model (whole store): a :class:`UsageSummary`."""
    for section, label in (("by_role", "role"), ("by_model", "model")):
        for name, u in sorted(getattr(usage, section).items()):
            errors = f", {u.errors} failed" if u.errors else ""
            write(f"    {label} {name}: {u.calls} calls{errors}, {u.prompt_tokens} prompt + {u.completion_tokens} completion tokens, {u.mean_latency_s:.2f}s mean latency\n")


def cmd_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .job import run_job
    from .progress import ProgressDisplay

    config = load_config(args.config, args.overrides)
    display = ProgressDisplay(config.run.progress, config.run.progress_interval_s)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        sys.stderr.write(f"\n{signal.Signals(signum).name}: stopping intake and saving finished work (again to abort)\n")
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    def on_event(message: str) -> None:
        sys.stderr.write(message + "\n")

    summary = run_job(config, on_progress=display, on_event=on_event, stop=stop)
    display.close(summary.progress)
    _print_summary(summary)
    return 0 if summary.progress.finished else 130


def cmd_status(args: argparse.Namespace) -> int:
    from .runinfo import RunInfo
    from .store import StoreReader

    reader = StoreReader(args.output)
    counts = reader.counts()
    raw = reader.run_info()
    info = RunInfo.from_dict(raw) if raw else None
    total = info.input_rows if info else None
    if args.json:
        run = {k: raw.get(k) for k in ("run_id", "status", "dataset", "started_at", "finished_at")}
        extra = {"usage": info.usage.to_dict(), "llm": [e.to_dict() for e in info.llm]} if info else {}
        print(json.dumps({"output": str(reader.root), **counts, "input_rows": total, "writer_active": reader.writer_active(), "run": run, **extra}, indent=1))
        return 0
    print(f"output:    {reader.root}")
    if info:
        print(f"run:       {info.run_id} ({'running now' if reader.writer_active() else info.status})")
        print(f"input:     {info.dataset} ({total} rows)")
    print(f"done:      {counts['ok']}")
    print(f"failed:    {counts['failed']}")
    for kind, n in counts["failed_by_kind"].items():
        print(f"  {kind}: {n}")
    if total is not None:
        print(f"remaining: {max(0, total - counts['records'])}")
    print(f"tokens:    {counts['prompt_tokens']} prompt + {counts['completion_tokens']} completion")
    if info:
        _print_usage(info.usage, sys.stdout.write)
        if info.metrics:
            print("metrics:   " + ", ".join(f"{k}={v}" for k, v in info.metrics.items()))
        for e in info.llm:
            where = f", on {e.host}" + (f" GPUs {','.join(e.gpu_ids)}" if e.gpu_ids else "") if e.host else ""
            print(f"llm:       model {e.model}: {e.url} ({e.state}, {e.restarts} restarts{where})")
    _print_slurm(reader.root)
    return 0


def _print_slurm(output: Path) -> None:
    """The run's Slurm jobs and their state (from sacct/scontrol), if it had any."""
    from .cluster.slurm.jobs import job_states, run_jobs

    jobs = run_jobs(output)
    if not jobs:
        return
    states = job_states([j["job_id"] for j in jobs])
    for j in jobs:
        st = states.get(j["job_id"], {})
        print(f"slurm:     job {j['job_id']} ({j['via']}): {st.get('state', 'unknown')}, restarts {st.get('restarts', '?')}, nodes {st.get('nodes') or '-'}")


def cmd_submit(args: argparse.Namespace) -> int:
    from .cluster.slurm import submit
    from .config import load_config

    output = Path(load_config(args.config, args.overrides).output.path).expanduser().resolve()
    job = submit(args.config, args.overrides)
    print(f"submitted Slurm job {job.job_id}; logs in {Path(job.paths.stdout).parent}")
    print(f"watch it: matrix-hpc status {output}   (re-submitting the same config resumes the run)")
    if not args.wait:
        return 0
    codes = job.results()
    print(f"job {job.job_id} ended; exit status per node: {codes}")
    return max(int(c) for c in codes) if codes else 1


def cmd_cancel(args: argparse.Namespace) -> int:
    from .cluster.slurm.jobs import cancel

    cancelled = cancel(args.output)
    print(f"cancelled {', '.join(cancelled)}" if cancelled else "no running or pending job for this output")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    return serve(args.config, args.overrides)


def cmd_check_health(args: argparse.Namespace) -> int:
    from .services.llm.health import check_health

    return check_health(args.target, args.url, args.model, args.timeout, args.api_key_env)


def cmd_export(args: argparse.Namespace) -> int:
    from .store import export_store

    n = export_store(args.output, args.to, args.format, args.status)
    print(f"wrote {n} records to {Path(args.to).resolve()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="matrix-hpc", description="Multi-agent synthetic data generation on Ray and Slurm.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) a workflow on this machine", description="Run a workflow; re-running the same command resumes it.")
    run.add_argument("config", help="job YAML, e.g. workflows/collab_reasoning/config.yaml")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. run.max_in_flight=500 output.path=/tmp/out")
    run.set_defaults(func=cmd_run)

    st = sub.add_parser("status", help="counts of an output store: done, failed by reason, remaining")
    st.add_argument("output", help="output folder (output.path of the run)")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(func=cmd_status)

    ex = sub.add_parser("export", help="write an output store's records to JSONL or Parquet")
    ex.add_argument("output", help="output folder (output.path of the run)")
    ex.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
    ex.add_argument("--to", required=True, help="file to write")
    ex.add_argument("--status", choices=["ok", "failed"], help="only records with this status")
    ex.set_defaults(func=cmd_export)

    sb = sub.add_parser("submit", help="submit a run to Slurm (submitit; cluster.slurm.* sets the allocation)", description="Submit the workflow as a Slurm job: one Ray cluster over cluster.slurm.nodes nodes; on USR2 (time limit, preemption) it saves its work and requeues itself. Re-submitting resumes.")
    sb.add_argument("config", help="job YAML")
    sb.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. cluster.slurm.nodes=4 cluster.slurm.partition=gpu")
    sb.add_argument("--wait", action="store_true", help="wait for the job to end (through requeues)")
    sb.set_defaults(func=cmd_submit)

    cc = sub.add_parser("cancel", help="scancel a run's Slurm jobs (finished work stays in the store)")
    cc.add_argument("output", help="output folder of the run (or its cluster.slurm.job_dir)")
    cc.set_defaults(func=cmd_cancel)

    sv = sub.add_parser("serve", help="start just the LLM service of a config and print its endpoints", description="Start the config's LLM service (Ray, registry, replicas), print the endpoints and keep them healthy until Ctrl-C. The endpoints are also written to OUTPUT/services.json for check-health.")
    sv.add_argument("config", help="job YAML")
    sv.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. llm.replicas=2")
    sv.set_defaults(func=cmd_serve)

    ch = sub.add_parser("check-health", help="probe LLM endpoints with a real one-token generation", description="Probe each endpoint with a one-token chat completion (a live /health alone does not prove a working engine). Exit 0 when all answer.")
    ch.add_argument("target", nargs="?", help="an output folder (of a run or a serve) or a job YAML; its endpoints are probed")
    ch.add_argument("--url", action="append", default=[], help="an endpoint to probe, e.g. http://host:8000/v1 (repeatable)")
    ch.add_argument("--model", help="model name for the probe (default: the config's llm.model)")
    ch.add_argument("--timeout", type=float, default=30.0, help="seconds per probe (default 30)")
    ch.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the endpoints' API key")
    ch.set_defaults(func=cmd_check_health)
    return ap


def main(argv: list[str] | None = None) -> int:
    from .runtime.source import DatasetError
    from .runtime.team import TeamError
    from .config import ConfigError
    from .services.llm import ServerStartError
    from .store import StoreError, StoreLockedError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"matrix-hpc: config error: {exc}", file=sys.stderr)
        return 2
    except (DatasetError, StoreError, StoreLockedError, TeamError, ServerStartError, FileNotFoundError, ImportError) as exc:
        print(f"matrix-hpc: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("matrix-hpc: aborted; committed work is kept, re-run to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
