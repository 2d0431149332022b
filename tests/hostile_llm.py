"""A hostile OpenAI-shaped chat server: a marker in the prompt picks a broken reply.

Real aiohttp on 127.0.0.1, on a thread of the test process (as ``counting_llm``).
Health probes (``max_tokens`` 1) and prompts without a marker get a normal reply, so
the endpoint stays routable and only the marked tasks meet the fault.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from typing import Any

from aiohttp import web

__all__ = ["HUGE_CHARS", "MARKERS", "HostileLLM"]

HUGE_CHARS = 4 << 20  # several megabytes of content


def _reply(content: Any, usage: Any = None, **choice: Any) -> dict[str, Any]:
    usage = {"prompt_tokens": 7, "completion_tokens": 3} if usage is None else usage
    return {
        "object": "chat.completion",
        "model": "default",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop", **choice}],
        "usage": usage,
    }


def _json(obj: Any, status: int = 200) -> web.Response:
    # json.dumps escapes a lone surrogate as \ud83d: the body is valid UTF-8, the string is not
    return web.Response(body=json.dumps(obj).encode(), status=status, content_type="application/json")


def _raw(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")


MARKERS: dict[str, Any] = {
    "[[lone-surrogate]]": lambda: _json(_reply("half an emoji \ud83d here")),
    "[[invalid-utf8]]": lambda: _raw(
        b'{"choices":[{"message":{"role":"assistant","content":"bad byte \xff here"},"finish_reason":"stop"}],"usage":{"prompt_tokens":7,"completion_tokens":3}}'
    ),
    "[[truncated]]": lambda: _raw(b'{"object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"cut of'),
    "[[no-choices]]": lambda: _json({"object": "chat.completion", "choices": [], "usage": {}}),
    "[[null-content]]": lambda: _json(_reply(None)),
    "[[huge]]": lambda: _json(_reply("x" * HUGE_CHARS)),
    "[[http500]]": lambda: _raw(b"internal error \xff\xfe (not UTF-8)", status=500),
    "[[bad-usage]]": lambda: _json(_reply("fine text", usage={"prompt_tokens": "lots", "completion_tokens": 10**30})),
    "[[not-object]]": lambda: _json(["not", "an", "object"]),
}


class HostileLLM:
    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        """Requests per marker (``""``: normal prompts)."""
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("max_tokens") == 1:  # a health probe
            return _json(_reply("ok"))
        prompt = " ".join(str(m.get("content", "")) for m in body.get("messages") or [])
        for marker, make in MARKERS.items():
            if marker in prompt:
                self.hits[marker] += 1
                return make()
        self.hits[""] += 1
        return _json(_reply(f"a fine answer to: {prompt[:60]}"))

    def _main(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        app = web.Application(client_max_size=1 << 24)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/v1"
        self._ready.set()
        loop.run_forever()

    def __enter__(self) -> HostileLLM:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the hostile LLM server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
