"""``matrix-hpc``: run a workflow, inspect and export its output.

The CLI owns everything printed; errors a user can fix print one line and exit
non-zero (2 for a bad config, 3 when every task of a run failed, 1 otherwise).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

log = logging.getLogger(__name__)

ALL_FAILED = 3
"""Exit status of a run whose tasks all failed (stopped early by ``run.stop_after_failures``, or finished)."""


def _print_summary(summary: Any, retry_hint: str = "") -> None:
    """One scope per line, labelled: ``this run`` (this life of the run) or ``store`` (every
    record in the output, earlier lives included)."""
    p, s = summary.progress, summary.store
    w = sys.stdout.write
    state = "finished" if p.finished else "INTERRUPTED (re-run the same command to resume)"
    w(f"\nrun {state} in {_timeline(p)}\n")
    resent = f", {p.resent} re-sent after crashes" if p.resent else ""
    w(f"  this run:  {p.ok} ok, {p.failed} failed, {p.skipped} skipped (already in the store){resent}\n")
    w(
        f"  this run:  {summary.tasks_per_s:.2f} tasks/s, {summary.tokens_per_s:.0f} output tok/s, {p.tokens.prompt_tokens} prompt + {p.tokens.completion_tokens} completion tokens\n"
    )
    for kind, n in sorted(p.failed_by_kind.items(), key=lambda kv: -kv[1]):
        sample = summary.failure_samples.get(kind)
        w(f"  this run:  failed {kind}: {n}" + (f", e.g. {sample}" if sample else "") + "\n")
    if summary.replay and summary.replay.calls:
        w(f"  this run:  replayed {_replay_line(summary.replay)}\n")
    w(f"  store:     {s['records']} records ({s['ok']} ok, {s['failed']} failed), {s['prompt_tokens']} prompt + {s['completion_tokens']} completion tokens\n")
    _print_usage(summary.usage, lambda line: w("  store:     " + line.lstrip()))
    if summary.metrics:
        w("  store:     metrics " + ", ".join(f"{k}={v}" for k, v in summary.metrics.items()) + "\n")
    for e in summary.llm:
        if e.restarts:
            w(f"  llm:       model {e.model}: {e.url} was restarted {e.restarts} time(s); {e.state} at the end of the run\n")
    if summary.agent_log and p.failed_by_kind.get("agent_error"):
        w(f"  log:       agent tracebacks in {summary.agent_log}\n")
    if summary.ray_logs and p.resent:
        w(f"  log:       crashed actors' output in {summary.ray_logs}\n")
    w(retry_hint)
    w(f"output: {summary.output}\n")
    w(look_hint(summary.output))


def look_hint(output: str) -> str:
    """The lines that end a run: how to look at its output, with the real path (copy and paste)."""
    o = shlex.quote(str(output))
    rows = [
        (f"matrix-hpc status {o}", "state, counts, failures by kind"),
        (f"matrix-hpc sample {o} -n 5", "a few records and their ids (--status failed, --where 'result.FIELD==VALUE')"),
        (f"matrix-hpc show {o} ID", "one record in full: each turn's text, the failure, the result"),
        (f"matrix-hpc export {o} --to data.jsonl", "every record (--format parquet or hf)"),
        (f"matrix-hpc view {o}", "browse the records in a web page"),
    ]
    width = max(len(cmd) for cmd, _ in rows)
    return "".join(f"{'look at it:' if i == 0 else '':<12}{cmd:<{width}}  {what}\n" for i, (cmd, what) in enumerate(rows))


def _timeline(p: Any) -> str:
    """The run's time by the clock, this process's start to now, in its phases: start-up
    (config, dataset scan, Ray, engines, actors), running tasks, shut-down (the final commit,
    the agents' close, Ray and the engines stopping, the summary)."""
    from .procs import process_age_s

    now, age = time.monotonic(), process_age_s()
    ended = p.ended_at or now
    if age is None:
        return f"{p.elapsed_s:.1f}s of running tasks"
    born = now - age
    return f"{age:.1f}s: start-up {max(0.0, p.started_at - born):.1f}s, running tasks {p.elapsed_s:.1f}s, shut-down {max(0.0, now - ended):.1f}s"


def _print_usage(usage: Any, write: Any) -> None:
    """LLM accounting per role and per model (whole store): a :class:`UsageSummary`."""
    for section, label in (("by_role", "role"), ("by_model", "model")):
        for name, u in sorted(getattr(usage, section).items()):
            errors = f", {u.errors} failed" if u.errors else ""
            write(
                f"    {label} {name}: {u.calls} calls{errors}, {u.prompt_tokens} prompt + {u.completion_tokens} completion tokens, {u.mean_latency_s:.2f}s mean latency\n"
            )


def _replay_line(r: Any) -> str:
    """What turn-level resume saved in a life (a :class:`ReplaySummary`)."""
    return (
        f"{r.calls} LLM calls from the journal instead of the engine: {r.tokens} tokens not generated again, "
        f"{r.saved_s:.1f}s of call latency summed over those calls (they overlapped: the time saved on the clock is less)"
    )


def cmd_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .job import run_job
    from .progress import ProgressDisplay
    from .stopsignals import StopSignals

    config = load_config(args.config, _retry_overrides(args))
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray's "(raylet) ..." lines, without colour codes in logs
    display = ProgressDisplay(config.run.progress, config.run.progress_interval_s)
    # INT, TERM and USR2 mean what matrix_hpc/stopsignals.py says (a second Ctrl-C aborts).
    stop = StopSignals(notify=lambda msg: display.event("\n" + msg), grace_s=config.run.stop_grace_s)
    summary = run_job(config, on_progress=display, on_event=display.event, stop=stop)
    display.close(summary.progress)
    _print_summary(summary, _retry_hint(summary, args))
    p = summary.progress
    if p.finished and p.failed and not p.ok:  # a bug that fails every task: not a success for scripts
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(p.failed_by_kind.items(), key=lambda kv: -kv[1]))
        print(f"matrix-hpc: error: every task of this run failed ({p.failed}: {kinds}); fix the cause (the failures above say which)", file=sys.stderr)
        return ALL_FAILED
    return 0 if p.finished else 130


def _retry_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides, with ``--retry-failed [KIND,...]`` as the key it sets (``run.retry_failed``):
    the one mechanism, so ``submit``, the sbatch scripts and a config file get it too."""
    overrides = list(args.overrides)
    value = getattr(args, "retry_failed", None)
    if value is not None:
        if "=" in value:  # `--retry-failed key=value`: argparse took an override as the flag's value
            overrides.append(value)
            value = "all"
        overrides.append(f"run.retry_failed={value}")
    return overrides


def _retry_hint(summary: Any, args: argparse.Namespace) -> str:
    """How to run the store's failed records again: the command as given, plus the flag."""
    failed = summary.store.get("failed", 0)
    if not failed or not summary.progress.finished:
        return ""
    cmd = " ".join(shlex.quote(a) for a in ["matrix-hpc", "run", args.config, *args.overrides, "--retry-failed"])
    return f"  retry:     {cmd}  runs the {failed} failed record(s) again (--retry-failed KIND[,KIND] for some kinds)\n"


def cmd_status(args: argparse.Namespace) -> int:
    from .run_state import run_state
    from .runinfo import RunInfo
    from .store import StoreReader
    from .store.journal import journal_size
    from .store.layout import RunLayout

    reader = StoreReader(args.output)
    counts = reader.counts()
    counts["replaced"] = reader.replaced()  # failed records retries replaced: history, in no count
    raw = reader.run_info()
    info = RunInfo.from_dict(raw) if raw else None
    total = info.input_rows if info else None
    state = run_state(info, reader.writer_active()) if info else None
    if args.json:
        run = {k: raw.get(k) for k in ("run_id", "status", "dataset", "started_at", "finished_at")}
        run["interruptions"] = info.interruptions if info else {}  # lives told to stop, by why
        extra = {"usage": info.usage.to_dict(), "llm": [e.to_dict() for e in info.llm], "replay": raw.get("replay")} if info else {}
        print(
            json.dumps(
                {"output": str(reader.root), **counts, "input_rows": total, "writer_active": reader.writer_active(), "state": state, "run": run, **extra},
                indent=1,
            )
        )
        return 0
    print(f"output:    {reader.root}")
    if info:
        print(f"run:       {info.run_id} ({state})")
        print(f"input:     {info.dataset} ({total} rows)")
        print(f"lives:     {_lives_line(info)}")
    print(f"done:      {counts['ok']}")
    print(f"failed:    {counts['failed']}")
    for kind, n in counts["failed_by_kind"].items():
        print(f"  {kind}: {n}")
    if counts["replaced"]:
        print(f"history:   {counts['replaced']} failed record(s) replaced by retries (show OUTPUT ID --history), in no count here")
    if total is not None:
        print(f"remaining: {max(0, total - counts['records'])}")
    print(f"tokens:    {counts['prompt_tokens']} prompt + {counts['completion_tokens']} completion")
    if info:
        _print_usage(info.usage, sys.stdout.write)
        if info.replay is not None:
            print(f"replayed:  {_replay_line(info.replay)} in the last life")
        if info.metrics:
            print("metrics:   " + ", ".join(f"{k}={v}" for k, v in info.metrics.items()))
        _print_llm(info, state)
    files, size = journal_size(RunLayout(reader.root).journal)
    if files:
        print(f"journal:   {size} bytes in {files} file(s): completed LLM calls of unfinished tasks, replayed on resume")
    _print_slurm(reader.root)
    return 0


def _lives_line(info: Any) -> str:
    """How many lives the run had and, counted apart, why those told to stop were: its time
    limit, a preemption, a requeue, a cancel (Slurm), or a signal (``SIGINT`` ...)."""
    why = ", ".join(f"{n} {cause.replace('_', ' ')}" for cause, n in sorted(info.interruptions.items()))
    return f"{len(info.history)}" + (f" (stopped by: {why})" if why else "")


def _print_llm(info: Any, state: str | None) -> None:
    """Endpoint states only where they are known: at the end of an ended run, or as
    recorded at the start of a live one (a crashed run's endpoints died with it)."""
    if state == "running now" and info.llm_state_at == "start":
        label = "at start"
    elif info.status in ("finished", "interrupted") and info.llm_state_at == "end":
        label = "at the end of the run"
    else:
        return
    for e in info.llm:
        where = f", on {e.host}" + (f" GPUs {','.join(e.gpu_ids)}" if e.gpu_ids else "") if e.host else ""
        print(f"llm:       model {e.model}: {e.url} ({label}: {e.state}, {e.restarts} restarts{where})")


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
    from .cluster.slurm.submitter import node_results
    from .config import load_config
    from .runtime.loader import check_workflow_code
    from .store.writable import check_output_writable

    overrides = _retry_overrides(args)
    config = load_config(args.config, overrides)
    check_workflow_code(config)  # a typo costs a second here, not a wait in the queue
    output = check_output_writable(config.output.path)
    job = submit(args.config, overrides)
    print(f"submitted Slurm job {job.job_id}; logs in {Path(job.paths.stdout).parent}")
    print(f"watch it: matrix-hpc status {output}   (re-submitting the same config resumes the run)")
    if not args.wait:
        return 0
    codes = node_results(job)
    print(f"job {job.job_id} ended; exit status per node: {codes}")
    lost = [i for i, c in enumerate(codes) if c is None]
    if lost:
        print(f"node(s) {', '.join(map(str, lost))} left no exit status (died or killed); node 0 runs the driver: its status is the run's")
    return codes[0] if codes and codes[0] is not None else 1


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
    from .store.export import Selection

    order = None
    if args.dataset_order:
        from .dataset_order import dataset_positions

        order = dataset_positions(args.output)
    sel = Selection(args.status, args.flatten_result, order)
    in_order = " in dataset order" if order is not None else ""
    if args.format == "hf":
        from .store.hf_export import export_hf

        res = export_hf(args.output, args.to, sel=sel)
        print(f"wrote {res.records} records{in_order} to {Path(args.to).resolve()} ({len(res.shards)} Parquet shard(s) in data/, dataset card README.md)")
    else:
        res = export_store(args.output, args.to, args.format, sel=sel)
        print(f"wrote {res.records} records{in_order} to {Path(args.to).resolve()}")
    if res.json_columns:
        print(f"note: column(s) {', '.join(res.json_columns)} written as JSON text: their values do not fit one Parquet type")
    if res.unplaced:
        print(f"note: {res.unplaced} record(s) of the store have an id the dataset does not hold now: written after the others, in store order")
    return 0


def cmd_view(args: argparse.Namespace) -> int:
    from .view import serve_view

    return serve_view(args.output, args.port)


_RETRY_HELP = (
    "run again the ids whose record in the store is failed (all, or only these failure kinds); each new record replaces "
    "the failed one in counts and exports, the failed one stays in the store (show ID --history). Sets run.retry_failed"
)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="matrix-hpc", description="Multi-agent synthetic data generation on Ray and Slurm.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="run (or resume) a workflow on this machine",
        description="Run a workflow; re-running the same command resumes it (ids already in the store, failed ones too, are skipped; --retry-failed runs the failed ones again).",
    )
    run.add_argument("config", help="job YAML, e.g. workflows/collab_reasoning/config.yaml")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. run.max_in_flight=500 output.path=/tmp/out")
    run.add_argument("--retry-failed", nargs="?", const="all", metavar="KIND[,KIND]", help=_RETRY_HELP)
    run.set_defaults(func=cmd_run)

    st = sub.add_parser("status", help="a run's state (running now, finished, interrupted, aborted, crashed) and counts: done, failed by reason, remaining")
    st.add_argument("output", help="output folder (output.path of the run)")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(func=cmd_status)

    ex = sub.add_parser("export", help="write an output store's records to JSONL, Parquet, or a Hugging Face dataset folder")
    ex.add_argument("output", help="output folder (output.path of the run)")
    ex.add_argument(
        "--format",
        choices=["jsonl", "parquet", "hf"],
        default="jsonl",
        help="hf: a folder of Parquet shards (data/train-*.parquet) with a dataset card, for datasets.load_dataset",
    )
    ex.add_argument("--to", required=True, help="file to write (a folder for --format hf)")
    ex.add_argument("--status", choices=["ok", "failed"], help="only records with this status")
    ex.add_argument(
        "--flatten-result",
        action="store_true",
        help="write result's fields as columns of their own (result.revisions; nested objects joined with dots, lists kept as values) instead of one result column",
    )
    ex.add_argument(
        "--dataset-order",
        action="store_true",
        help="write records in the order of the dataset's rows (read again from the run's dataset.path, which must still be there) instead of the order tasks finished in",
    )
    ex.set_defaults(func=cmd_export)

    vw = sub.add_parser(
        "view",
        help="browse a run's records in a local web page (live while the run writes)",
        description="Serve a web page of the run's records on 127.0.0.1 and print its URL (with a random token; without it every request gets 403). It reads only committed records and never blocks the writer, so it can watch a running job's store on a shared file system.",
    )
    vw.add_argument("output", help="output folder (output.path of the run)")
    vw.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    vw.set_defaults(func=cmd_view)

    from .terminal import add_parsers as add_terminal_parsers

    add_terminal_parsers(sub)  # show, sample

    sb = sub.add_parser(
        "submit",
        help="submit a run to Slurm (submitit; cluster.slurm.* sets the allocation)",
        description="Submit the workflow as a Slurm job: one Ray cluster over cluster.slurm.nodes nodes; on USR2 (time limit, preemption) it saves its work and requeues itself. Re-submitting resumes.",
    )
    sb.add_argument("config", help="job YAML")
    sb.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. cluster.slurm.nodes=4 cluster.slurm.partition=gpu")
    sb.add_argument("--wait", action="store_true", help="wait for the job to end (through requeues); exit with node 0's status, the driver's")
    sb.add_argument("--retry-failed", nargs="?", const="all", metavar="KIND[,KIND]", help=_RETRY_HELP)
    sb.set_defaults(func=cmd_submit)

    cc = sub.add_parser("cancel", help="scancel a run's Slurm jobs (finished work stays in the store)")
    cc.add_argument("output", help="output folder of the run (or its cluster.slurm.job_dir)")
    cc.set_defaults(func=cmd_cancel)

    sv = sub.add_parser(
        "serve",
        help="start just the LLM services of a config and print their endpoints",
        description="Start the config's LLM services (Ray, one registry and its replicas per model), print the endpoints and keep them healthy until Ctrl-C. The endpoints are also written to OUTPUT/services.json for check-health.",
    )
    sv.add_argument("config", help="job YAML")
    sv.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. llm.replicas=2")
    sv.set_defaults(func=cmd_serve)

    ch = sub.add_parser(
        "check-health",
        help="probe LLM endpoints with a real one-token generation",
        description="Probe each endpoint with a one-token chat completion (a live /health alone does not prove a working engine). Exit 0 when all answer.",
    )
    ch.add_argument("target", nargs="?", help="an output folder (of a run or a serve) or a job YAML; its endpoints are probed")
    ch.add_argument("--url", action="append", default=[], help="an endpoint to probe, e.g. http://host:8000/v1 (repeatable)")
    ch.add_argument(
        "--model",
        help="model name for the probe (default: each endpoint's served model, from the config or the output's record); where the server lists /v1/models, it must be listed",
    )
    ch.add_argument("--timeout", type=float, default=30.0, help="seconds per probe (default 30)")
    ch.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the endpoints' API key")
    ch.set_defaults(func=cmd_check_health)
    return ap


def main(argv: list[str] | None = None) -> int:
    """The CLI; output cut short by its reader (``matrix-hpc status OUT | head``) ends it
    quietly with status 141, as a command killed by SIGPIPE in a shell pipeline."""
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # here, not at exit: a reader that left is seen inside the try
    except BrokenPipeError:
        if not (_closed(sys.stdout) or _closed(sys.stderr)):
            raise  # another pipe (a bug): its traceback is wanted
        # What CPython's docs on SIGPIPE advise: point stdout at devnull, so the flush at
        # exit cannot raise again ("Exception ignored ... BrokenPipeError").
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            if _closed(stream):
                os.dup2(devnull, stream.fileno())
        return 128 + signal.SIGPIPE


def _closed(stream: Any) -> bool:
    """Whether ``stream``'s reader has gone: a pipe's write end polls POLLERR once no reader is left."""
    import select

    try:
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


# The errors a command ends with in one line, and its exit status, by the module that defines
# each. They are looked up in sys.modules: an error can only come from a module already
# imported, and importing them all up front (Ray, aiohttp, the runtime) cost every command,
# `status` and `--help` included, ~2.5 s of CPU.
_ONE_LINE_ERRORS: tuple[tuple[str, str, str, int], ...] = (
    ("matrix_hpc.config.build", "ConfigError", "config error: ", 2),
    ("matrix_hpc.runtime.runner", "AllFailing", "error: ", ALL_FAILED),
    ("matrix_hpc.store.writable", "OutputPathError", "error: ", 2),
    ("matrix_hpc.runtime.shards", "DatasetError", "error: ", 1),
    ("matrix_hpc.store.zarr_store", "StoreError", "error: ", 1),
    ("matrix_hpc.store.fsutil", "StoreLockedError", "error: ", 1),
    ("matrix_hpc.runtime.team", "TeamError", "error: ", 1),
    ("matrix_hpc.services.llm.base", "ServerStartError", "error: ", 1),
)


def one_line_error(exc: BaseException) -> tuple[str, int] | None:
    """``(prefix, exit status)`` when ``exc`` ends a command with one line; None: a bug, raise it."""
    for module, name, prefix, status in _ONE_LINE_ERRORS:
        mod = sys.modules.get(module)
        if mod is not None and isinstance(exc, getattr(mod, name)):
            return prefix, status
    if isinstance(exc, (FileNotFoundError, ImportError)):
        return "error: ", 1
    return None


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "overrides", None) is not None and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra  # key=value after an option (`--retry-failed KIND key=value`)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("matrix-hpc: aborted; committed work is kept, re-run to resume", file=sys.stderr)
        return 130
    except Exception as exc:
        known = one_line_error(exc)
        if known is None:
            raise
        print(f"matrix-hpc: {known[0]}{exc}", file=sys.stderr)
        return known[1]


if __name__ == "__main__":
    sys.exit(main())
