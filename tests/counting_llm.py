"""A deterministic, request-counting OpenAI-shaped chat server for replay tests.

Its answer is a pure function of the request (model, messages, sampling), so two
runs of a deterministic workflow produce the same texts turn by turn; it counts
every request it receives (health probes apart) and can hold answers back (``freeze``), which makes
"calls in flight at a kill" an exact number. It runs on a thread of the test
process, bound to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import threading
from typing import Any

from aiohttp import web


def answer(body: dict[str, Any]) -> tuple[str, int]:
    """(text, completion tokens) for a request; collab-reasoning shaped.

    The teacher always says (A); the student says (A) for about one prompt in twelve,
    else (B): dialogues mostly run to ``max_turns``, some end early on agreement.
    """
    key = json.dumps([body.get("model"), body.get("messages"), body.get("temperature"), body.get("max_tokens")], sort_keys=True)
    h = int(hashlib.sha256(key.encode()).hexdigest()[:12], 16)
    prompt = " ".join(str(m.get("content", "")) for m in body.get("messages") or [])
    student = "Your turn (student)" in prompt
    letter = ("A" if h % 12 == 0 else "B") if student else "A"
    return f"Reply {h % 10007}: I weighed it. The answer is ({letter}).", 5 + h % 17


class CountingLLM:
    def __init__(self, delay_s: tuple[float, float] = (0.02, 0.12), host: str = "127.0.0.1") -> None:
        self.delay_s = delay_s
        self.host = host  # the test Slurm cluster's nodes reach this host at its bridge address
        self.received = 0
        self.answered = 0
        self.probes = 0
        self._frozen = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self.url = ""
        self._lock = threading.Lock()
        self._held: dict[int, str] = {}  # calls not answered yet: their last message's text
        self._seq = 0

    # -- server ------------------------------------------------------------
    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("max_tokens") == 1:  # the registry's health probe: answered, not counted
            self.probes += 1
            return web.json_response({"model": "default", "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}], "usage": {}})
        with self._lock:
            self.received += 1
            self._seq += 1
            key = self._seq
            self._held[key] = str(((body.get("messages") or [{}])[-1]).get("content", ""))
        try:
            await asyncio.sleep(random.uniform(*self.delay_s))  # order varies; answers do not
            while self._frozen.is_set():  # held: in flight until the client dies
                await asyncio.sleep(0.05)
        finally:
            with self._lock:
                self._held.pop(key, None)
        text, n = answer(body)
        prompt_tokens = max(1, sum(len(str(m.get("content", ""))) for m in body.get("messages") or []) // 4)
        with self._lock:
            self.answered += 1
        return web.json_response(
            {
                "object": "chat.completion",
                "model": body.get("model") or "default",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n},
            }
        )

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, self.host, 0)
        loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://{self.host}:{port}/v1"
        self._ready.set()
        loop.run_forever()

    def start(self) -> CountingLLM:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        self._frozen.clear()
        if self._loop is not None and self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    # -- test controls -----------------------------------------------------
    def freeze(self) -> None:
        """Hold every answer not yet sent (and every new one) until :meth:`thaw`."""
        self._frozen.set()

    def thaw(self) -> None:
        self._frozen.clear()

    def held_prompts(self) -> list[str]:
        """The last message of each call not answered yet."""
        with self._lock:
            return list(self._held.values())

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self.received - self.answered
