"""The work per hop that must not grow with the tasks in flight, counted, not timed.

A hop's CPU is mostly fixed costs per Ray call (``docs/performance.md``, ``benchmarks.
profile_hop``): the outbox batches messages so that more tasks in flight mean fewer Ray
calls per hop. Counted here on a real run (Ray, the relay workflow: no LLM) from the
actors' own counters, which every run reports (``RunProgress.ray_calls``). The objects a
task builds on the wire are counted in ``tests/test_task_wire.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

from matrix_hpc.config import load_config
from matrix_hpc.job import run_job

REPO = Path(__file__).resolve().parents[1]
TASKS, HOPS = 150, 10


def _calls_per_1000_hops(tmp: Path, in_flight: int) -> float:
    data = tmp / f"d{in_flight}.jsonl"
    data.write_text("".join(json.dumps({"id": f"t{i:05d}"}) + "\n" for i in range(TASKS)))
    cfg = load_config(
        REPO / "benchmarks" / "relay" / "config.yaml",
        [f"dataset.path={data}", f"output.path={tmp}/out{in_flight}", f"workflow.params.hops={HOPS}", f"run.max_in_flight={in_flight}", "cluster.num_cpus=2"],
    )
    summary = run_job(cfg)
    assert summary.store["ok"] == TASKS, summary.store
    calls = summary.progress.ray_calls
    assert calls > 0, "the actors' pings carry their outboxes' Ray calls"
    return 1000 * calls / (TASKS * HOPS)


def test_ray_calls_per_hop_fall_as_tasks_in_flight_grow(tmp_path: Path) -> None:
    few = _calls_per_1000_hops(tmp_path, 4)
    many = _calls_per_1000_hops(tmp_path, TASKS)
    # Never more than one call per message (hops, plus one record per task to the sink).
    bound = 1000 * (TASKS * HOPS + TASKS) / (TASKS * HOPS)
    assert few <= bound and many <= bound, (few, many)
    # Two actors holding 2 tasks each send batches of at most 2 (measured: 250 calls per 1000
    # hops); holding 75 each, the window parks ~10% of them per batch (measured at 200 in
    # flight: 20). A regression to one call per message fails here, whatever the load.
    assert many <= few / 2, f"{many:.0f} Ray calls per 1000 hops with every task in flight, {few:.0f} with 4"
