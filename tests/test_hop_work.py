"""The work per hop that must not grow with the tasks in flight, counted, not timed.

A hop's CPU is mostly fixed costs per Ray call (``docs/performance.md``, ``benchmarks.
profile_hop``): the outbox batches messages so that more tasks in flight mean fewer Ray
calls per hop. Counted here on a real run (Ray, the relay workflow: no LLM) from the
actors' own counters, which every run reports (``RunProgress.ray_calls``). The driver's
rounds (a sink poll and a dispatch each) are batched the same way: a poll answers once a
share of the slots is free, checked here on the real sink actor. The objects a task
builds on the wire are counted in ``tests/test_task_wire.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import ray

from matrix_hpc.config import load_config
from matrix_hpc.job import run_job
from matrix_hpc.runtime.sink import SinkActor

from .conftest import ok_rows, private_ray

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


def test_a_sink_poll_answers_once_a_share_of_the_slots_is_free_not_at_each_task(tmp_path: Path) -> None:
    """The driver asks for ``max_in_flight / 10`` received ids per poll (``runner._REFILL_SHARE``);
    the sink holds the poll until that many came, any id is committed, or the wait is over."""
    with private_ray("poll-share-test", num_cpus=1):
        sink = SinkActor.remote(str(tmp_path / "out"), 64, 3600.0, False, False)  # no timed commit: only flush() commits
        inc = ray.get(sink.poll.remote(None, 0, 0, 0.0))[0]
        poll = sink.poll.remote(inc, 0, 0, 120.0, 5)
        ray.get(sink.receive.remote(ok_rows(["a", "b", "c"])))
        ready, _ = ray.wait([poll], timeout=2.0)
        assert not ready, "a poll for 5 answered at 3 received ids"
        ray.get(sink.receive.remote(ok_rows(["d", "e"])))
        _, received, committed, _ = ray.get(poll, timeout=60)
        assert received == ["a", "b", "c", "d", "e"] and committed == []
        # A commit answers a poll that waits for received ids: the driver's books follow commits.
        poll = sink.poll.remote(inc, 5, 0, 120.0, 5)
        ray.get(sink.flush.remote())
        _, received, committed, _ = ray.get(poll, timeout=60)
        assert received == [] and sorted(committed) == ["a", "b", "c", "d", "e"]
        # The wait is bounded, and one id answers a poll for one (the driver's last tasks).
        assert ray.get(sink.poll.remote(inc, 5, 5, 0.2, 5), timeout=60)[1:3] == ([], [])
        poll = sink.poll.remote(inc, 5, 5, 120.0, 1)
        ray.get(sink.receive.remote(ok_rows(["f"])))
        assert ray.get(poll, timeout=60)[1] == ["f"]
        ray.get(sink.close.remote())
