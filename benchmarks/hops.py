"""CPU cost of one agent hop in the runtime, with no LLM in the way.

    python -m benchmarks.hops [--tasks 20000] [--hops 10] [--repeats 3]

Tasks relay between two roles (``benchmarks/relay``) ``--hops`` times each. The
table shows hops/s and CPU ms per hop (all processes of the run: driver, actors,
sink, Ray's own daemons) for message batching on (the default) and off
(``run.batch_size=1``: one Ray call per message, the baseline).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from benchmarks.throughput import REPO, TreeSampler
from matrix_hpc.config import load_config
from matrix_hpc.job import run_job


def one(tasks: int, hops: int, in_flight: int, overrides: list[str]) -> tuple[float, float, bool]:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "d.jsonl"
        data.write_text("".join(json.dumps({"id": f"t{i:07d}"}) + "\n" for i in range(tasks)))
        cfg = load_config(
            REPO / "benchmarks" / "relay" / "config.yaml",
            [f"dataset.path={data}", f"output.path={tmp}/out", f"workflow.params.hops={hops}", f"run.max_in_flight={in_flight}", *overrides],
        )
        sampler = TreeSampler(set())
        state: dict[str, bool] = {}

        def on_progress(_: object) -> None:
            if not state:
                state["on"] = True
                sampler.__enter__()

        summary = run_job(cfg, on_progress=on_progress)
        sampler.__exit__(None, None, None)
        total_hops = tasks * hops
        complete = summary.store["records"] == tasks and summary.store["ok"] == tasks
        return total_hops / summary.progress.elapsed_s, 1000 * sampler.cpu_s / total_hops, complete


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=20000)
    ap.add_argument("--hops", type=int, default=10)
    ap.add_argument("--in-flight", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cases = [("batched (batch_size=64)", []), ("one Ray call per message (batch_size=1)", ["run.batch_size=1"])]
    print(f"{'case':42} {'hops/s':>9} {'cpu ms/hop':>11} {'complete':>9}")
    for name, ov in cases:
        tasks = args.tasks if not ov else max(1000, args.tasks // 10)  # the unbatched baseline is slow
        runs = [one(tasks, args.hops, args.in_flight, ov) for _ in range(args.repeats)]
        print(
            f"{name:42} {statistics.median(r[0] for r in runs):9.0f} {statistics.median(r[1] for r in runs):11.3f} {str(all(r[2] for r in runs)):>9}",
            flush=True,
        )
    print(f"({args.hops} hops per task, {args.in_flight} in flight, medians of {args.repeats}; baseline on a tenth of the tasks)")


if __name__ == "__main__":
    main()
