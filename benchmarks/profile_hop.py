"""Where an agent actor's (or the sink's) CPU goes, per LLM hop: an itemized py-spy profile.

    python -m benchmarks.profile_hop [--workflow collab_reasoning] [--concurrency 100]
                                     [--tasks 3000] [--seconds 20] [--rate 100]
                                     [--actor AgentActor|SinkActor] [engine options]

It starts ``benchmarks.throughput`` (ours only; options it does not know, such as the
engine's ``--a 0.05`` or ``--max-batch 256 --out-mean 16``, go to it) in a subprocess,
waits until the run is under way, then samples every ``ray::AgentActor`` process (or those
of ``--actor``) with py-spy (native frames included, idle stacks left out) and reads each
thread's CPU from ``/proc``. Each sample is given to one part of the hop by its innermost
frame that names one (see ``PARTS``), and the table prints each part's share of the
actors' samples and its CPU ms per LLM hop (the share times the actors' CPU per LLM hop
that the benchmark itself measures).

Native frames need py-spy to pause each actor for a moment per sample (``--nonblocking``
cannot read them): the profiled run is a little slower than an unprofiled one, and the
table's shares, not the row's throughput, are what it is for. py-spy's own CPU is not
counted (the benchmark measures the run's process tree, not py-spy's).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil

PARTS: list[tuple[str, re.Pattern[str]]] = [
    ("garbage collection", re.compile(r"gcbudget|gc_collect|\bgc\b|collect_main|gc_collect_main|deduce_unreachable")),
    ("the call journal", re.compile(r"runtime/replay\.py|store/journal\.py")),
    ("metrics", re.compile(r"matrix_hpc/metrics\.py|prometheus")),
    ("limits and slots", re.compile(r"runtime/limits\.py|services/llm/slots\.py")),
    ("loop-lag watcher", re.compile(r"runtime/health\.py")),
    ("building the record", re.compile(r"to_record|RecordRow|store/textsafe\.py|_to_sink")),
    ("the store (zarr, numcodecs, numpy)", re.compile(r"zarr|numcodecs|numpy|store/zarr_store\.py|store/schema\.py")),
    ("the sink's bookkeeping", re.compile(r"runtime/sink\.py|runtime/commit")),
    ("task pickling", re.compile(r"runtime/task\.py|__reduce__|_restore")),
    ("(de)serializing batches", re.compile(r"serialization\.py|_deserialize|_serialize|pickle|cloudpickle|msgpack")),
    ("Ray calls", re.compile(r"ray/actor\.py|_raylet|submit_actor_task|ray/_private/worker\.py|runtime/outbox\.py|core_worker|grpc|boost|ray::")),
    ("HTTP client and JSON", re.compile(r"aiohttp|yarl|multidict|json/|services/llm/client\.py|_json|http_parser|http_writer")),
    ("agent code", re.compile(r"workflows/|agents\.py")),
    ("asyncio scheduling", re.compile(r"asyncio/|_asyncio|uvloop|epoll|selectors\.py")),
]
"""A sample goes to the first part (innermost frame first, then this order) that names it."""


def llm_hop_pattern(actor: str) -> re.Pattern[str]:
    """The benchmark's "CPU ms/hop by process" entry for these actors."""
    return re.compile(rf"ray::{actor} (\d+\.\d+)")


def part_of(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):  # innermost first
        for name, pattern in PARTS:
            if pattern.search(frame):
                return name
    return "other (interpreter, libc)"


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds per thread id, with the thread's name."""
    out: dict[int, tuple[str, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return out


CLOCK_TICKS = 100.0
THREAD = re.compile(r"^thread \((\d+)\)")


def itemize(raw_text: str, cpu: dict[int, tuple[str, float]]) -> Counter[str]:
    """CPU seconds per part: each thread's measured CPU, split by its GIL-holding samples.

    A thread with no such sample (Ray's C++ threads: gRPC polling, its I/O service, the
    task-event buffer) is given whole to "Ray's C++ threads"; py-spy cannot tell a native
    thread's work from its waiting, ``/proc`` can.
    """
    per_thread: dict[int, Counter[str]] = {}
    for line in raw_text.splitlines():
        stack, _, n = line.rpartition(" ")
        m = THREAD.match(stack)
        if not (m and n.isdigit()):
            continue
        per_thread.setdefault(int(m.group(1)), Counter())[part_of(stack.split(";", 1)[-1])] += int(n)
    out = Counter[str]()
    for tid, (name, seconds) in cpu.items():
        parts = per_thread.get(tid)
        if not parts:
            out["Ray's C++ threads (gRPC, I/O, task events)" if name not in ("python", "PythonGCThread") else f"thread {name}"] += seconds
            continue
        total = sum(parts.values())
        for part, n in parts.items():
            out[part] += seconds * n / total
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workflow", default="collab_reasoning")
    ap.add_argument("--concurrency", type=int, default=100)
    ap.add_argument("--tasks", type=int, default=3000)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    ap.add_argument("--actor", default="AgentActor", help="which actors to sample: AgentActor, SinkActor, EndpointRegistry")
    args, engine = ap.parse_known_args()  # the rest goes to benchmarks.throughput (--a 0.05, --max-batch 256, ...)
    bench = [sys.executable, "-m", "benchmarks.throughput", "--workflow", args.workflow, "--concurrency", str(args.concurrency)]
    bench += ["--tasks", str(args.tasks), "--repeats", "1", "--schedulers", "ours", "--scale", "", *engine]
    parts = Counter[str]()
    names = Counter[str]()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "bench.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(bench, stdout=out, stderr=subprocess.STDOUT)
        try:
            actors = wait_for_actors(proc, args.actor, timeout_s=300)
            before = {p: thread_cpu(p) for p in actors}
            raws = [Path(tmp) / f"{p}.txt" for p in actors]
            spies = [
                subprocess.Popen(
                    [
                        "py-spy",
                        "record",
                        "-p",
                        str(p),
                        "-d",
                        str(int(args.seconds)),
                        "-r",
                        str(args.rate),
                        "--native",
                        "--gil",
                        "--threads",
                        "-f",
                        "raw",
                        "-o",
                        str(r),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                for p, r in zip(actors, raws, strict=True)
            ]
            for s in spies:
                _, err = s.communicate()
                if s.returncode:
                    raise SystemExit(f"py-spy failed: {err.decode(errors='replace').strip()}")
            for p, raw in zip(actors, raws, strict=True):
                if not psutil.pid_exists(p) or not raw.exists():
                    continue
                cpu = {tid: (name, sec - before[p].get(tid, (name, 0.0))[1]) for tid, (name, sec) in thread_cpu(p).items()}
                parts.update(itemize(raw.read_text(), cpu))
                for name, sec in cpu.values():
                    names[name] += sec
            proc.wait(timeout=1800)
        finally:
            if proc.poll() is None:
                proc.kill()
        text = log.read_text()
    m = llm_hop_pattern(args.actor).search(text)
    row = next((ln for ln in text.splitlines() if ln.startswith("ours ")), "")
    print(row)
    per_hop_ms = float(m.group(1)) if m else float("nan")
    cols = row.split()
    llm_ratio = float(cols[12]) / float(cols[11]) if len(cols) > 12 else 2.0  # /LLM hop over /hop
    actor_llm_ms = per_hop_ms * llm_ratio
    total = sum(parts.values()) or 1.0
    print(f"\n{args.actor}: {actor_llm_ms:.3f} CPU ms per LLM hop ({len(actors)} actors, {total:.1f} CPU s sampled over {args.seconds:.0f}s)")
    print(f"{'part of the hop':44} {'share':>6} {'ms/LLM hop':>11}")
    for name, sec in parts.most_common():
        print(f"{name:44} {sec / total:6.1%} {actor_llm_ms * sec / total:11.3f}")
    print("\nthe actors' CPU by thread name:", ", ".join(f"{n} {sec / total:.0%}" for n, sec in names.most_common(8)))


def wait_for_actors(proc: subprocess.Popen[bytes], actor: str, timeout_s: float) -> list[int]:
    """The run's ``actor`` processes, once tasks flow through them (a twentieth of a core each)."""
    deadline = time.monotonic() + timeout_s
    last: dict[int, float] = {}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the benchmark ended before its actors got work (exit {proc.returncode})")
        now: dict[int, float] = {}
        for p in psutil.Process(proc.pid).children(recursive=True):  # this run's Ray only
            try:
                if p.cmdline()[:1] and p.cmdline()[0].startswith(f"ray::{actor}"):
                    t = p.cpu_times()
                    now[p.pid] = t.user + t.system
            except psutil.Error:
                continue
        if now and last and sum(now.values()) - sum(last.get(p, now[p]) for p in now) >= 0.05 * len(now):
            return sorted(now)
        last = now
        time.sleep(1.0)
    raise SystemExit(f"no {actor} got work")


if __name__ == "__main__":
    main()
