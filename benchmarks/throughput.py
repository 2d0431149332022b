"""Throughput of matrix-hpc's row-level, peer-to-peer scheduling against baselines.

    python -m benchmarks.throughput --workflow collab_reasoning --concurrency 100,1000
    python -m benchmarks.throughput --workflow web_reasoning --concurrency 100,1000 --json out.json
    python -m benchmarks.throughput --concurrency '' --scale 50000,100000   # scale rows only
    python -m benchmarks.throughput --schedulers ours --replay compare   # the call journal's cost

Every scheduler runs the same workflow agents against the same latency-model
engine (``benchmarks.latency_engine``, a separate process), whose analytic peak
tokens/s is the ceiling. Per scheduler and concurrency it prints the median of
``--repeats`` runs: tasks/s, output tokens/s, utilization (achieved ÷ peak), engine
fill (share of its batch slots busy per step: the scheduler kept it fed even when the
machine's load made its steps late), the machine's load average, p50/p99
task latency, CPU ms per agent hop and per LLM hop (all processes but the engine),
peak RSS, and whether the store holds every id exactly once. ``ours-nometrics`` is
ours with ``run.metrics=false`` (what the Prometheus metrics cost). The scale rows
(``--scale``) run ours, then the central asyncio loop (``--scale-schedulers``), with as
many tasks as in flight (50,000 and 100,000 by default) against a bigger engine batch, so
that a cost growing with the number of waiting tasks shows as lost utilization, and the
central loop shows what one process with no Ray reaches on the same machine.
``--replay compare`` runs ours with the call journal (``run.replay``) on and off
("ours/noreplay") and prints the difference. ``--auth compare`` runs ours with Ray's token
authentication (what every run has) and without it ("ours/noauth", an instrument: the
run's cluster is started with ``RAY_AUTH_MODE=disabled``, which nothing else in the
project does), and prints tokens/s and start-up time (``run_job`` to the first task) of both.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from benchmarks.baselines import Finished, run_batch_sync, run_central, run_ray_data
from benchmarks.latency_engine import LatencyModel
from matrix_hpc.config import load_config, resolve_dataset_path
from matrix_hpc.runtime.source import SourceOptions, iter_tasks
from matrix_hpc.services.llm import probe_generation
from matrix_hpc.services.llm.embedded import free_port
from matrix_hpc.store import RecordRow, StoreReader, StoreWriter

REPO = Path(__file__).resolve().parent.parent
SCHEDULERS = ("ours", "ours-nometrics", "batch_sync", "central", "ray_data")
PIPELINES = {"web_reasoning": ["filter", "scorer", "questioner"]}  # fixed stage order for ray_data


@dataclass
class Row:
    scheduler: str
    workflow: str
    concurrency: int
    tasks_per_s: float
    tokens_per_s: float
    utilization: float
    p50_s: float
    p99_s: float
    cpu_ms_per_hop: float
    peak_rss_mb: float
    cpu_ms_per_llm_hop: float
    complete: bool
    tasks: int = 0
    ray_warnings: int = 0
    """Ray log lines warning of pending/backlogged calls (ours only)."""
    load: float = 0.0
    """The machine's 1-minute load average at the end of the run (the engine shares the cores)."""
    engine_fill: float = 0.0
    """Share of the engine's batch slots busy over its modeled time plus its idle time: how well
    the scheduler kept it fed, whatever the wall clock did (a CPU-starved engine steps late,
    which lowers ``utilization`` but not this)."""
    cpu_by_kind: dict[str, float] = field(default_factory=dict)
    """CPU ms per hop by process kind (``--cpu-breakdown``)."""
    rss_by_kind: dict[str, float] = field(default_factory=dict)
    """MB of RSS by process kind at the run's peak (process count in the kind's name)."""
    peak_pss_mb: float = 0.0
    """Ours: the run's PSS at the RSS peak: shared pages (Python, Ray's libraries) split
    between the processes that map them, so what the run takes from the machine."""
    ray_calls_per_khop: float = 0.0
    """Ours: batches the agents' outboxes sent (one Ray call each) per 1,000 hops."""
    startup_s: float = 0.0
    """Ours: from ``run_job`` to the first task sent (Ray, the team, the agents' setup)."""


class TreeSampler:
    """CPU seconds and peak RSS of this process and its descendants, minus excluded pids."""

    def __init__(self, exclude: set[int], interval_s: float = 0.2) -> None:
        self.exclude = exclude
        self.interval_s = interval_s
        self.peak_rss = 0
        self.rss_at_peak: dict[str, int] = {}
        """RSS bytes by process kind at the sample with the highest total (sums across kinds)."""
        self.pss_at_peak = 0
        """PSS bytes of all processes at that sample (read only then: it walks every mapping)."""
        self.own_cpu_s = 0.0
        """CPU this sampler's thread spent (the instrument's cost, not the run's)."""
        self._cpu: dict[int, float] = {}
        self._names: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _procs(self) -> list[psutil.Process]:
        me = psutil.Process()
        skip = set(self.exclude)
        for pid in self.exclude:
            try:
                skip.update(c.pid for c in psutil.Process(pid).children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        return [me] + [p for p in me.children(recursive=True) if p.pid not in skip]

    def sample(self) -> None:
        rss = 0
        by_kind: dict[str, int] = {}
        count: dict[str, int] = {}
        procs = self._procs()
        for p in procs:
            try:
                t = p.cpu_times()
                self._cpu[p.pid] = t.user + t.system  # cumulative per process: keep the latest
                if p.pid not in self._names:
                    self._names[p.pid] = _kind(p)
                r = p.memory_info().rss
            except psutil.NoSuchProcess:
                continue
            rss += r
            kind = self._names[p.pid]
            by_kind[kind] = by_kind.get(kind, 0) + r
            count[kind] = count.get(kind, 0) + 1
        if rss > self.peak_rss:
            self.peak_rss = rss
            self.rss_at_peak = {(k if count[k] == 1 else f"{k} x{count[k]}"): v for k, v in by_kind.items()}
            self.pss_at_peak = sum(_pss(p) for p in procs)

    def _loop(self) -> None:
        started = time.thread_time()
        while not self._stop.wait(self.interval_s):
            self.sample()
        self.own_cpu_s = time.thread_time() - started

    def __enter__(self) -> TreeSampler:
        self.sample()
        self._start = dict(self._cpu)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sample()
        self._stop.set()
        self._thread.join()

    @property
    def cpu_s(self) -> float:
        return sum(v - self._start.get(pid, 0.0) for pid, v in self._cpu.items()) - self.own_cpu_s

    def by_kind(self) -> dict[str, float]:
        """CPU seconds per process kind (driver, raylet, gcs, AgentActor, ...)."""
        out: dict[str, float] = {}
        for pid, v in self._cpu.items():
            kind = self._names.get(pid, "?")
            out[kind] = out.get(kind, 0.0) + v - self._start.get(pid, 0.0)
        out["driver"] = out.get("driver", 0.0) - self.own_cpu_s
        return out


def _pss(p: psutil.Process) -> int:
    try:
        return int(getattr(p.memory_full_info(), "pss", 0))
    except (psutil.Error, OSError):
        return 0


def _kind(p: psutil.Process) -> str:
    try:
        cmd = p.cmdline()
        name = p.name()
    except psutil.Error:
        return "?"
    if p.pid == os.getpid():
        return "driver"
    head = cmd[0] if cmd else name
    if head.startswith("ray::"):
        return head.split(".")[0]  # ray::AgentActor.receive -> ray::AgentActor
    for key in ("raylet", "gcs_server", "dashboard/agent.py", "runtime_env/agent", "log_monitor", "monitor.py", "default_worker.py"):
        if any(key in c for c in cmd[:3]):
            return key
    return os.path.basename(head)


def _raise_priority(nice: int) -> None:
    try:
        os.nice(nice)  # negative: needs root; the engine then keeps its timing under load
    except OSError:
        pass


def start_engine(model: LatencyModel, seed: int, nice: int = 0) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    args = [sys.executable, "-m", "benchmarks.latency_engine", "--port", str(port), "--seed", str(seed)]
    for f, v in asdict(model).items():
        args += [f"--{f.replace('_', '-')}", str(v)]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=lambda: _raise_priority(nice))
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 30
    while not probe_generation(url, timeout_s=2):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("latency engine did not start")
        time.sleep(0.1)
    return proc, url


def make_dataset(workflow: str, n: int, path: Path) -> Path:
    """n rows cycled from the workflow's bundled data, each with a unique id."""
    cfg = load_config(REPO / "workflows" / workflow / "config.yaml")
    src = resolve_dataset_path(cfg)
    rows = [json.loads(x) for x in src.read_text().splitlines() if x.strip()]
    with open(path, "w") as fh:
        for i in range(n):
            row = dict(rows[i % len(rows)])
            row[cfg.dataset.id_field] = f"{row.get(cfg.dataset.id_field, 'r')}-{i:06d}"
            fh.write(json.dumps(row) + "\n")
    return path


OURS_SET: list[str] = []  # --set key=value overrides for our runtime
LAST_BREAKDOWN: dict[str, float] = {}  # CPU seconds by process kind of the last run of ours
LAST_RSS: dict[str, int] = {}  # RSS bytes by process kind at the last run of ours' peak
LAST_PSS: list[int] = []  # PSS bytes of all processes at that peak
LAST_RAY_CALLS: list[int] = []  # the agents' outbox Ray calls in the last run of ours


def job_yaml(workflow: str, data: Path, out: Path, url: str, concurrency: int, tmp: Path) -> Path:
    cfg = yaml.safe_load((REPO / "workflows" / workflow / "config.yaml").read_text())
    cfg["dataset"].update(path=str(data), limit=None)
    cfg["llm"].update(engine="external", base_urls=[url], max_tokens=1024, timeout_s=600.0)
    cfg["output"].update(path=str(out))
    cfg["run"].update(max_in_flight=concurrency, progress="off")  # per-actor limits follow it (runtime.limits)
    path = tmp / f"{workflow}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def summarize(scheduler: str, workflow: str, concurrency: int, elapsed: float, cpu_s: float, rss: int, out: Path, n: int, peak: float) -> Row:
    reader = StoreReader(out)
    records = list(reader.iter_records())
    ids = [r["id"] for r in records]
    lat = sorted(r["finished_at"] - r["created_at"] for r in records)
    tokens = sum(r["usage"]["completion_tokens"] for r in records)
    hops = sum(r.get("hops", 0) for r in records)
    llm_hops = sum(1 for r in records for t in r["turns"] if t.get("endpoint"))
    return Row(
        scheduler=scheduler, workflow=workflow, concurrency=concurrency,
        tasks_per_s=n / elapsed, tokens_per_s=tokens / elapsed, utilization=tokens / elapsed / peak,
        p50_s=lat[len(lat) // 2] if lat else 0.0, p99_s=lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else 0.0,
        cpu_ms_per_hop=1000 * cpu_s / max(hops, 1), peak_rss_mb=rss / 2**20, cpu_ms_per_llm_hop=1000 * cpu_s / max(llm_hops, 1),
        complete=len(ids) == n and len(set(ids)) == n, tasks=n,
    )  # fmt: skip


_BACKLOG = re.compile(r"pending|backlog|queued", re.IGNORECASE)


def count_backlog_warnings(logs: str | None) -> int:
    if not logs or not Path(logs).is_dir():
        return 0
    n = 0
    for f in Path(logs).rglob("*"):
        if f.is_file() and f.suffix in (".out", ".err", ".log"):
            for line in f.read_text(errors="replace").splitlines():
                n += "WARN" in line and bool(_BACKLOG.search(line))
    return n


class _NoAuth:
    """Instrument for ``ours/noauth``: stands in for ``matrix_hpc.cluster.auth.RayAuth`` while the
    run's cluster starts, so it runs without token authentication (its cost, measured)."""

    def __init__(self, token: str | None = None, token_path: str | None = None) -> None:
        from matrix_hpc.cluster import auth

        self._saved = {k: os.environ.pop(k, None) for k in auth.AUTH_ENV}
        os.environ["RAY_AUTH_MODE"] = "disabled"
        auth._refresh_ray()

    def restore(self) -> None:
        from matrix_hpc.cluster import auth

        for k, v in self._saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v
        auth._refresh_ray()


STARTUP: list[float] = []  # the last run's start-up seconds (ours)


def run_ours(job: Path, exclude: set[int], extra: list[str], auth: bool = True) -> tuple[float, float, int, int]:
    from matrix_hpc.cluster import local
    from matrix_hpc.job import run_job

    config = load_config(job, OURS_SET + extra)
    sampler = TreeSampler(exclude)
    started: dict[str, float] = {}
    t_call = time.monotonic()

    def on_progress(p: Any) -> None:
        if not started:  # Ray and the team are up: start measuring here
            started["t"] = time.monotonic()
            STARTUP[:] = [p.started_at - t_call]
            sampler.__enter__()
            ENGINE.start()
        if p.remaining == 0 and "end" not in started:  # all committed: the work ends here, not after shutdown
            started["end"] = time.monotonic()
            sampler.__exit__(None, None, None)  # CPU too: team and Ray shutdown are not the run's work (baselines have none)
            ENGINE.stop()

    real = local.RayAuth
    local.RayAuth = real if auth else _NoAuth  # type: ignore[misc,assignment]
    try:
        summary = run_job(config, on_progress=on_progress)
    finally:
        local.RayAuth = real  # type: ignore[misc]
    elapsed = started.get("end", time.monotonic()) - summary.progress.started_at
    if "end" not in started:
        sampler.__exit__(None, None, None)
    LAST_BREAKDOWN.clear()
    LAST_BREAKDOWN.update(sampler.by_kind())
    LAST_RSS.clear()
    LAST_RSS.update(sampler.rss_at_peak)
    LAST_PSS[:] = [sampler.pss_at_peak]
    LAST_RAY_CALLS[:] = [summary.progress.ray_calls]
    return elapsed, sampler.cpu_s, sampler.peak_rss, count_backlog_warnings(summary.ray_logs)


def run_baseline(fn: Callable[[], Finished], out: Path, exclude: set[int]) -> tuple[float, float, int]:
    with TreeSampler(exclude) as sampler:
        t = time.monotonic()
        ENGINE.start()
        finished = fn()
        ENGINE.stop()
        writer = StoreWriter(out, fsync=True)
        writer.append([RecordRow.from_record(task.to_record(finished_at=at)) for task, at in finished])
        writer.close()
        elapsed = time.monotonic() - t
    return elapsed, sampler.cpu_s, sampler.peak_rss


def engine_stats(url: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(url.removesuffix("/v1") + "/stats", timeout=10) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


class EngineWindow:
    """The engine's counters over the measured part of a run (not Ray's start or shutdown)."""

    def __init__(self) -> None:
        self.url = ""
        self.before: dict[str, Any] = {}
        self.after: dict[str, Any] = {}

    def start(self) -> None:
        self.before = engine_stats(self.url)

    def stop(self) -> None:
        self.after = engine_stats(self.url)

    def fill(self) -> float:
        b, a = self.before, self.after
        if not b or not a:
            return 0.0
        engine_s = a["model_s"] - b["model_s"] + a["idle_s"] - b["idle_s"]
        return (a["busy_slot_s"] - b["busy_slot_s"]) / max(1e-9, engine_s * a["model"]["max_batch"])


ENGINE = EngineWindow()


def one_run(scheduler: str, workflow: str, concurrency: int, n: int, url: str, exclude: set[int], peak: float) -> Row:
    ENGINE.url, ENGINE.before, ENGINE.after = url, {}, {}
    row = _one_run(scheduler, workflow, concurrency, n, url, exclude, peak)
    row.engine_fill = ENGINE.fill()
    row.load = os.getloadavg()[0]
    return row


def _one_run(scheduler: str, workflow: str, concurrency: int, n: int, url: str, exclude: set[int], peak: float) -> Row:
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        data = make_dataset(workflow, n, tmp / "data.jsonl")
        out = tmp / "out"
        job = job_yaml(workflow, data, out, url, concurrency, tmp)
        warnings = 0
        if scheduler.startswith("ours"):
            extra = {"ours-nometrics": ["run.metrics=false"], "ours/noreplay": ["run.replay=false"]}.get(scheduler, [])
            elapsed, cpu, rss, warnings = run_ours(job, exclude, extra, auth=scheduler != "ours/noauth")
        else:
            config = load_config(job)
            opts = SourceOptions(path=data, entry_role=config.workflow.entry, required_fields=tuple(config.dataset.required_fields))
            tasks = list(iter_tasks(opts))
            if scheduler == "batch_sync":
                fn = lambda: run_batch_sync(config, url, tasks, concurrency)  # noqa: E731
            elif scheduler == "central":
                fn = lambda: run_central(config, url, tasks, concurrency)  # noqa: E731
            else:
                import ray

                from matrix_hpc.cluster.auth import RayAuth
                from matrix_hpc.credentials import new_secret

                ray_auth = RayAuth(token=new_secret())  # token auth, as our runs have
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
                fn = lambda: run_ray_data(config, url, tasks, concurrency, PIPELINES[workflow])  # noqa: E731
            try:
                elapsed, cpu, rss = run_baseline(fn, out, exclude)
            finally:
                if scheduler == "ray_data":
                    ray.shutdown()
                    ray_auth.restore()
        row = summarize(scheduler, workflow, concurrency, elapsed, cpu, rss, out, n, peak)
        row.ray_warnings = warnings
        if scheduler.startswith("ours"):
            row.startup_s = STARTUP[0] if STARTUP else 0.0
            hops = row.cpu_ms_per_hop and cpu * 1000 / row.cpu_ms_per_hop
            row.cpu_by_kind = {k: 1000 * v / max(hops, 1) for k, v in LAST_BREAKDOWN.items()}
            row.rss_by_kind = {k: v / 2**20 for k, v in LAST_RSS.items()}
            row.peak_pss_mb = LAST_PSS[0] / 2**20 if LAST_PSS else 0.0
            row.ray_calls_per_khop = 1000 * LAST_RAY_CALLS[0] / max(hops, 1) if LAST_RAY_CALLS else 0.0
        return row


def median_row(rows: list[Row]) -> Row:
    med = rows[0].__class__(**asdict(rows[0]))
    for f in (
        "tasks_per_s",
        "tokens_per_s",
        "utilization",
        "p50_s",
        "p99_s",
        "cpu_ms_per_hop",
        "cpu_ms_per_llm_hop",
        "peak_rss_mb",
        "engine_fill",
        "load",
        "startup_s",
        "ray_calls_per_khop",
        "peak_pss_mb",
    ):
        setattr(med, f, statistics.median(getattr(r, f) for r in rows))
    med.complete = all(r.complete for r in rows)
    med.ray_warnings = max(r.ray_warnings for r in rows)
    kinds = {k for r in rows for k in r.cpu_by_kind}
    med.cpu_by_kind = {k: statistics.median(r.cpu_by_kind.get(k, 0.0) for r in rows) for k in kinds}
    kinds = {k for r in rows for k in r.rss_by_kind}
    med.rss_by_kind = {k: statistics.median(r.rss_by_kind.get(k, 0.0) for r in rows) for k in kinds}
    return med


def print_table(rows: list[Row], peak: float, title: str = "medians of repeats") -> None:
    print(f"\nengine peak {peak:.0f} tok/s; {title}")
    head = f"{'scheduler':14} {'workflow':16} {'conc':>6} {'tasks':>6} {'tasks/s':>8} {'tok/s':>8} {'util':>6} {'fill':>6} {'load':>5} {'p50 s':>7} {'p99 s':>7} {'cpu ms/hop':>10} {'/LLM hop':>8} {'RSS MB':>7} {'complete':>8} {'ray warn':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r.scheduler:14} {r.workflow:16} {r.concurrency:6d} {r.tasks:6d} {r.tasks_per_s:8.1f} {r.tokens_per_s:8.0f} {r.utilization:6.1%} {r.engine_fill:6.1%} {r.load:5.1f} {r.p50_s:7.2f} {r.p99_s:7.2f} {r.cpu_ms_per_hop:10.3f} {r.cpu_ms_per_llm_hop:8.3f} {r.peak_rss_mb:7.0f} {str(r.complete):>8} {r.ray_warnings:8d}"
        )
    for r in rows:
        if r.cpu_by_kind:
            parts = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r.cpu_by_kind.items(), key=lambda kv: -kv[1]) if v >= 0.005)
            print(f"  {r.scheduler} {r.workflow} @ {r.concurrency}: CPU ms/hop by process: {parts}; Ray calls per 1000 hops: {r.ray_calls_per_khop:.0f}")
        if r.rss_by_kind:
            parts = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r.rss_by_kind.items(), key=lambda kv: -kv[1]) if v >= 1)
            print(f"  {r.scheduler} {r.workflow} @ {r.concurrency}: RSS MB at peak by process: {parts}; PSS of them all {r.peak_pss_mb:.0f} MB")
    by = {(r.workflow, r.concurrency, r.scheduler): r for r in rows}
    for (wf, conc, sched), r in sorted(by.items()):
        if sched == "ours" and (wf, conc, "ours-nometrics") in by:
            off = by[(wf, conc, "ours-nometrics")]
            print(
                f"  {wf} @ {conc}: metrics cost {r.cpu_ms_per_hop - off.cpu_ms_per_hop:+.3f} CPU ms/hop ({r.cpu_ms_per_hop:.3f} with, {off.cpu_ms_per_hop:.3f} without), utilization {r.utilization - off.utilization:+.1%}"
            )
        noauth = by.get((wf, conc, "ours/noauth"))
        if sched == "ours" and noauth is not None:
            print(f"  {wf} @ {conc}: Ray token auth on / off = {r.tokens_per_s / max(noauth.tokens_per_s, 1e-9):.3f}x tokens/s "
                  f"({r.tokens_per_s:.0f} vs {noauth.tokens_per_s:.0f}); start-up {r.startup_s:.1f}s vs {noauth.startup_s:.1f}s; "
                  f"cpu per LLM hop {r.cpu_ms_per_llm_hop:.3f} vs {noauth.cpu_ms_per_llm_hop:.3f} ms")  # fmt: skip
        off = by.get((wf, conc, "ours/noreplay"))
        if sched == "ours" and off is not None:
            print(f"  {wf} @ {conc}: replay on / off = {r.tokens_per_s / max(off.tokens_per_s, 1e-9):.3f}x tokens/s, "
                  f"cpu per hop {r.cpu_ms_per_hop:.3f} vs {off.cpu_ms_per_hop:.3f} ms ({r.cpu_ms_per_hop - off.cpu_ms_per_hop:+.3f} ms)")  # fmt: skip
        if sched == "ours":
            for base in SCHEDULERS[2:]:
                if (wf, conc, base) in by:
                    print(f"  {wf} @ {conc}: ours / {base} = {r.tokens_per_s / max(by[(wf, conc, base)].tokens_per_s, 1e-9):.2f}x tokens/s")


def main() -> None:
    ap = argparse.ArgumentParser(description="Row-level (ours) vs batch-level scheduling on a latency-model engine.")
    ap.add_argument("--workflow", default="collab_reasoning", choices=["collab_reasoning", "web_reasoning"])
    ap.add_argument("--concurrency", default="100,1000", help="comma-separated tasks in flight")
    ap.add_argument("--tasks", type=int, default=1000, help="tasks per run (at least the concurrency)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--schedulers", default=",".join(SCHEDULERS))
    ap.add_argument("--json", type=Path, help="also write the rows as a JSON list")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--engine-nice",
        type=int,
        default=-10,
        help="CPU priority of the engine process: it stands in for a GPU, so the system under test must not slow it down (negative needs root)",
    )
    ap.add_argument("--replay", choices=["on", "off", "compare"], default="on", help="our runtime's call journal (run.replay); compare runs both")
    ap.add_argument("--auth", choices=["on", "compare"], default="on", help="compare: also run ours without Ray's token authentication (ours/noauth)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for our runtime (repeatable)")
    ap.add_argument("--scale", default="50000,100000", help="scale rows: tasks (= tasks in flight) per run, one run each ('' to skip)")
    ap.add_argument("--scale-schedulers", default="ours,central", help="who runs the scale rows (comma-separated)")
    ap.add_argument("--scale-max-batch", type=int, default=256, help="engine max_batch for the scale rows")
    ap.add_argument("--scale-out-mean", type=float, default=16.0, help="engine out_mean for the scale rows (short answers: minutes, not hours)")
    for f, default in asdict(LatencyModel()).items():
        ap.add_argument(f"--{f.replace('_', '-')}", type=type(default), default=default, help=f"engine {f}")
    args = ap.parse_args()
    model = LatencyModel(**{f: getattr(args, f) for f in asdict(LatencyModel())})
    OURS_SET.extend(args.set)
    scheds = [s for s in args.schedulers.split(",") if s]
    if "ours" in scheds and args.replay != "on":
        at = scheds.index("ours")
        scheds[at : at + 1] = ["ours", "ours/noreplay"] if args.replay == "compare" else ["ours/noreplay"]
    if "ours" in scheds and args.auth == "compare":
        scheds.insert(scheds.index("ours") + 1, "ours/noauth")
    if args.workflow not in PIPELINES and "ray_data" in scheds:
        print(f"ray_data: skipped for {args.workflow} (its roles loop; no fixed stage pipeline)", file=sys.stderr)
        scheds.remove("ray_data")
    engine, url = start_engine(model, args.seed, args.engine_nice)
    rows: list[Row] = []
    try:
        for conc in (int(c) for c in args.concurrency.split(",") if c.strip()):
            n = max(args.tasks, conc)
            reps: dict[str, list[Row]] = {sched: [] for sched in scheds}
            for rep in range(args.repeats):  # schedulers take turns: a load change on the machine hits all alike
                for sched in scheds:
                    row = one_run(sched, args.workflow, conc, n, url, {engine.pid}, model.peak_tokens_per_s)
                    print(
                        f"  {sched} conc={conc} run {rep + 1}: {row.tokens_per_s:.0f} tok/s, util {row.utilization:.1%}, fill {row.engine_fill:.1%}, load {row.load:.1f}, {row.cpu_ms_per_llm_hop:.3f} CPU ms/LLM hop, complete={row.complete}",
                        file=sys.stderr,
                        flush=True,
                    )
                    reps[sched].append(row)
            rows.extend(median_row(r) for r in reps.values())
    finally:
        engine.terminate()
        engine.wait()
    if rows:
        print_table(rows, model.peak_tokens_per_s)
    scale = [int(c) for c in args.scale.split(",") if c.strip()]
    if scale:
        big = LatencyModel(**{**asdict(model), "max_batch": args.scale_max_batch, "out_mean": args.scale_out_mean})
        engine, url = start_engine(big, args.seed, args.engine_nice)
        try:
            scale_rows = []
            for n in scale:
                for sched in (s for s in args.scale_schedulers.split(",") if s):
                    row = one_run(sched, args.workflow, n, n, url, {engine.pid}, big.peak_tokens_per_s)
                    print(
                        f"  {sched} scale {n}: {row.tokens_per_s:.0f} tok/s, util {row.utilization:.1%}, fill {row.engine_fill:.1%}, load {row.load:.1f}, {row.cpu_ms_per_llm_hop:.3f} CPU ms/LLM hop, complete={row.complete}",
                        file=sys.stderr,
                        flush=True,
                    )
                    scale_rows.append(row)
        finally:
            engine.terminate()
            engine.wait()
        print_table(
            scale_rows, big.peak_tokens_per_s, f"scale rows (max_batch {big.max_batch}, out_mean {big.out_mean:g}), one run each, every task in flight at once"
        )
        rows += scale_rows
    if args.json:
        keys = (
            "scheduler",
            "workflow",
            "concurrency",
            "tasks",
            "tasks_per_s",
            "tokens_per_s",
            "utilization",
            "engine_fill",
            "load",
            "p50_s",
            "p99_s",
            "cpu_ms_per_hop",
            "cpu_ms_per_llm_hop",
            "peak_rss_mb",
            "complete",
            "cpu_by_kind",
            "rss_by_kind",
            "peak_pss_mb",
            "ray_calls_per_khop",
        )
        args.json.write_text(json.dumps([{k: getattr(r, k) for k in keys} for r in rows], indent=1))


if __name__ == "__main__":
    main()
