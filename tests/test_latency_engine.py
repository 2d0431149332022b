"""The latency-model engine (a benchmark instrument): its timing model, exactly, and live."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest
from aiohttp import web

from benchmarks.latency_engine import LatencyEngine, LatencyModel, SimRequest, make_app, simulate
from matrix_hpc.services.llm import ChatClient
from matrix_hpc.services.llm.embedded import free_port

MODEL = LatencyModel(a=0.01, b=0.001, c=0.0001, max_batch=2)


def test_simulate_small_case_exactly() -> None:
    # Three requests at t=0 into 2 slots: r0 (2 tokens) and r1 (3 tokens) start;
    # r2 (1 token) waits for r0's slot.
    reqs = [SimRequest(0.0, 10, 2), SimRequest(0.0, 10, 3), SimRequest(0.0, 20, 1)]
    simulate(MODEL, reqs)
    step1 = 0.01 + 0.001 * 2 + 0.0001 * 20  # two running, 20 prompt tokens admitted
    step2 = 0.01 + 0.001 * 2  # r0 finishes here
    step3 = 0.01 + 0.001 * 2 + 0.0001 * 20  # r2 joins (prefill 20); r1 and r2 finish
    assert reqs[0].finished == pytest.approx(step1 + step2)
    assert reqs[1].finished == pytest.approx(step1 + step2 + step3)
    assert reqs[2].finished == pytest.approx(step1 + step2 + step3)


def test_simulate_idle_gap_and_peak() -> None:
    reqs = simulate(MODEL, [SimRequest(0.0, 0, 1), SimRequest(5.0, 0, 1)])
    assert reqs[0].finished == pytest.approx(0.011) and reqs[1].finished == pytest.approx(5.011)
    # Saturated and prefill-free, the engine emits exactly its analytic peak.
    many = simulate(MODEL, [SimRequest(0.0, 0, 100) for _ in range(2)])
    assert 200 / many[-1].finished == pytest.approx(MODEL.peak_tokens_per_s)


def test_output_lengths_are_capped_and_have_the_configured_mean() -> None:
    rng = random.Random(1)
    m = LatencyModel(out_mean=50, out_sigma=0.5)
    lens = [m.draw_output_len(rng, 10_000) for _ in range(20_000)]
    assert 48 < sum(lens) / len(lens) < 52 and max(lens) > 120  # stragglers exist
    assert max(m.draw_output_len(rng, 16) for _ in range(100)) == 16


def test_live_engine_follows_the_model() -> None:
    model = LatencyModel(a=0.02, b=0.0, c=0.0, max_batch=4, out_mean=5, out_sigma=0.0)

    async def main() -> tuple[float, list[int], dict[str, Any]]:
        engine = LatencyEngine(model)
        runner = web.AppRunner(make_app(engine))
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        client = ChatClient([f"http://127.0.0.1:{port}/v1"], max_retries=0)
        t = time.monotonic()
        # 8 requests of 5 tokens into 4 slots: two waves of 5 steps of 20 ms = 0.2 s.
        res = await asyncio.gather(*(client.chat([{"role": "user", "content": "x"}], max_tokens=100) for _ in range(8)))
        elapsed = time.monotonic() - t
        await client.close()
        await runner.cleanup()
        return elapsed, [r.completion_tokens for r in res], engine.stats()

    elapsed, tokens, stats = asyncio.run(main())
    assert tokens == [5] * 8
    # Two waves of 5 steps in the model's time; the wall clock can only be later (a busy
    # machine steps late), never earlier: the engine paces itself to the model.
    assert stats["steps"] == 10 and abs(stats["model_s"] - 0.2) < 1e-9, stats
    assert elapsed >= 0.19
