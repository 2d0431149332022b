"""A real OpenAI-shaped HTTP server on loopback, in its own thread, for run-level tests."""

from __future__ import annotations

import asyncio
import threading
import time

from aiohttp import web

from matrix_hpc.services.llm.embedded import free_port

__all__ = ["PeakServer"]


class PeakServer:
    """A real OpenAI-shaped HTTP server (own thread and loop) that holds each request
    ``delay_s`` and records the most requests it held at once."""

    def __init__(self, delay_s: float, bad_probes: int = 0) -> None:
        self.delay_s = delay_s
        self.bad_probes = bad_probes
        """The first this many health probes (``max_tokens`` 1) get a 200 whose body is ``null``."""
        self.probes = 0
        self.first_good_probe_at: float | None = None
        self.first_chat_at: float | None = None
        self.in_flight = self.peak = self.requests = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("max_tokens") == 1:
            self.probes += 1
            if self.probes <= self.bad_probes:
                return web.json_response(None)
            self.first_good_probe_at = self.first_good_probe_at or time.time()
        else:
            self.first_chat_at = self.first_chat_at or time.time()
        self.requests += 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if body.get("max_tokens") != 1:  # health probes answer at once
                await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        return web.json_response(
            {"choices": [{"message": {"content": "The answer is (A)."}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 5, "completion_tokens": 5}}
        )

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, backlog=4096).start()

    def __enter__(self) -> PeakServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
