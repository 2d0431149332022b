"""A benchmark instrument: an OpenAI-compatible chat server that *times* like a
continuous-batching GPU server but computes nothing.

Timing model (one engine step):
    step_s = a + b * running + c * prompt_tokens_admitted_this_step
Up to ``max_batch`` sequences run at once; every running sequence gains one token
per step; extra requests wait in FIFO order and join at the next step boundary.
Output lengths are drawn from a log-normal distribution (mean ``out_mean``,
shape ``out_sigma``), capped by the request's ``max_tokens``: some tasks straggle.

With every slot busy and no prefill the engine emits its analytic peak:
    peak_tokens_per_s = max_batch / (a + b * max_batch)
which is the ceiling every scheduler in ``benchmarks.throughput`` is measured against.

Run: ``python -m benchmarks.latency_engine --port 8000 [--max-batch 64 ...]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web

__all__ = ["LatencyModel", "SimRequest", "simulate", "LatencyEngine", "make_app"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatencyModel:
    a: float = 0.002
    """Fixed seconds per decode step."""
    b: float = 0.00003
    """Extra seconds per running sequence per step."""
    c: float = 0.000002
    """Prefill seconds per prompt token admitted in a step."""
    max_batch: int = 64
    out_mean: float = 64.0
    out_sigma: float = 0.6

    @property
    def peak_tokens_per_s(self) -> float:
        return self.max_batch / (self.a + self.b * self.max_batch)

    def draw_output_len(self, rng: random.Random, max_tokens: int) -> int:
        mu = math.log(self.out_mean) - self.out_sigma**2 / 2  # so the mean is out_mean
        return max(1, min(max_tokens, round(rng.lognormvariate(mu, self.out_sigma))))


@dataclass
class SimRequest:
    arrival: float
    prompt_tokens: int
    output_tokens: int
    finished: float | None = None


def simulate(model: LatencyModel, requests: list[SimRequest]) -> list[SimRequest]:
    """Virtual-time replay of the model: fills in ``finished`` for every request.

    This pure function *is* the timing model; the live engine runs the same steps
    against the wall clock, so tests can check the model exactly.
    """
    pending = deque(sorted(requests, key=lambda r: r.arrival))
    running: list[list[Any]] = []  # [request, tokens left]
    now = 0.0
    while pending or running:
        if not running and pending and pending[0].arrival > now:
            now = pending[0].arrival
        admitted = 0
        while pending and pending[0].arrival <= now and len(running) < model.max_batch:
            req = pending.popleft()
            running.append([req, req.output_tokens])
            admitted += req.prompt_tokens
        now += model.a + model.b * len(running) + model.c * admitted
        for item in running:
            item[1] -= 1
            if item[1] == 0:
                item[0].finished = now
        running = [item for item in running if item[1] > 0]
    return requests


Responder = Callable[[list[dict[str, Any]], random.Random], str]


def default_responder(messages: list[dict[str, Any]], rng: random.Random) -> str:
    """Replies shaped like what the bundled workflows parse (answers, yes/no, JSON)."""
    text = " ".join(str(m.get("content", "")) for m in messages)
    if "The answer is (X)" in text:
        letters = "ABCD"
        # Agreement after a random number of turns: answers drift toward A.
        return f"Let me think. The answer is ({'A' if rng.random() < 0.5 else rng.choice(letters)})."
    if "yes or no" in text.lower():
        return "yes" if rng.random() < 0.85 else "no"
    if "reasoning_depth" in text:
        return json.dumps({"reasoning_depth": rng.randint(2, 5), "factual_density": rng.randint(2, 5), "clarity": rng.randint(2, 5)})
    if '"question"' in text and '"answer"' in text:
        return json.dumps({"question": "Why does the described effect occur?", "answer": "Because of the mechanism in the text."})
    return "ok"


class LatencyEngine:
    """The live engine: the simulate() step loop on the wall clock."""

    def __init__(self, model: LatencyModel, seed: int = 0, responder: Responder = default_responder) -> None:
        self.model = model
        self.rng = random.Random(seed)
        self.responder = responder
        self.waiting: deque[list[Any]] = deque()
        self.running: list[list[Any]] = []
        self._wake = asyncio.Event()
        self.steps = 0
        self.busy_slot_steps = 0
        self.tokens = 0
        self.requests = 0
        self.model_s = 0.0
        """Modeled engine time so far (the sum of step times, whatever the wall clock did)."""
        self.busy_slot_s = 0.0
        """Sum over steps of running sequences × step time: busy_slot_s / (max_batch × model_s)
        is the time-weighted batch fill."""
        self.idle_s = 0.0
        """Wall time with nothing to run (no request waiting or running)."""
        self._idle_from: float | None = None

    async def generate(self, prompt_tokens: int, max_tokens: int) -> int:
        n = self.model.draw_output_len(self.rng, max_tokens)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.waiting.append([fut, prompt_tokens, n])
        self._wake.set()
        return await fut

    async def run(self) -> None:
        m = self.model
        next_t = time.monotonic()
        while True:
            if not self.running and not self.waiting:
                self._wake.clear()
                self._idle_from = time.monotonic()
                await self._wake.wait()
                next_t = time.monotonic()
                self.idle_s += next_t - self._idle_from
                self._idle_from = None
            admitted = 0
            while self.waiting and len(self.running) < m.max_batch:
                fut, prompt, n = self.waiting.popleft()
                self.running.append([fut, n, n])
                admitted += prompt
            # Absolute deadlines: event-loop overhead does not accumulate as drift.
            step_s = m.a + m.b * len(self.running) + m.c * admitted
            next_t += step_s
            self.model_s += step_s
            self.busy_slot_s += step_s * len(self.running)
            delay = next_t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.steps += 1
            self.busy_slot_steps += len(self.running)
            self.tokens += len(self.running)
            still = []
            for item in self.running:
                item[1] -= 1
                if item[1] == 0:
                    if not item[0].done():
                        item[0].set_result(item[2])
                else:
                    still.append(item)
            self.running = still

    def stats(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "tokens": self.tokens,
            "model_s": self.model_s,
            "busy_slot_s": self.busy_slot_s,
            "idle_s": self.idle_s + (time.monotonic() - self._idle_from if self._idle_from is not None else 0.0),
            "requests": self.requests,
            "waiting": len(self.waiting),
            "running": len(self.running),
            "model": asdict(self.model),
            "peak_tokens_per_s": self.model.peak_tokens_per_s,
        }


_LOOP_TASK = web.AppKey("loop_task", asyncio.Task)


def make_app(engine: LatencyEngine) -> web.Application:
    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        messages = body.get("messages") or []
        prompt_tokens = max(1, sum(len(str(m.get("content", ""))) for m in messages) // 4)
        engine.requests += 1
        n = await engine.generate(prompt_tokens, int(body.get("max_tokens") or 256))
        text = engine.responder(messages, engine.rng)
        return web.json_response(
            {
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n},
            }
        )

    async def stats(_: web.Request) -> web.Response:
        return web.json_response(engine.stats())

    async def start_loop(app: web.Application) -> None:
        app[_LOOP_TASK] = asyncio.get_running_loop().create_task(engine.run())

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/stats", stats)
    app.on_startup.append(start_loop)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description="Latency-model OpenAI-compatible engine (a benchmark instrument).")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    for f, default in asdict(LatencyModel()).items():
        ap.add_argument(f"--{f.replace('_', '-')}", type=type(default), default=default)
    args = ap.parse_args()
    model = LatencyModel(**{f: getattr(args, f) for f in asdict(LatencyModel())})
    print(f"latency engine on http://{args.host}:{args.port}/v1, peak {model.peak_tokens_per_s:.0f} tok/s", flush=True)
    web.run_app(make_app(LatencyEngine(model, args.seed)), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
