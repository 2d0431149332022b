"""The chat client against real HTTP servers, and the embedded engine's lifecycle."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiohttp import web

from matrix_hpc.services.llm import ChatClient, EmbeddedEngine, LLMError
from matrix_hpc.services.llm.embedded import free_port


async def _flaky_server(fail_first: int, status: int) -> tuple[web.AppRunner, str, dict[str, int]]:
    seen = {"n": 0}

    async def chat(request: web.Request) -> web.Response:
        seen["n"] += 1
        if seen["n"] <= fail_first:
            return web.Response(status=status, text="busy")
        body = await request.json()
        return web.json_response({"choices": [{"message": {"content": f"echo {body['messages'][-1]['content']}"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 5, "completion_tokens": 2}})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}/v1", seen


@pytest.mark.parametrize("status", [429, 503])
def test_retries_transient_errors_then_succeeds(status: int) -> None:
    async def main() -> None:
        runner, url, seen = await _flaky_server(fail_first=2, status=status)
        client = ChatClient([url], max_retries=3, retry_backoff_s=0.01)
        res = await client.chat([{"role": "user", "content": "hi"}])
        assert (res.text, res.prompt_tokens, res.completion_tokens, seen["n"]) == ("echo hi", 5, 2, 3)
        await client.close()
        await runner.cleanup()

    asyncio.run(main())


def test_gives_up_with_reason_and_does_not_retry_client_errors() -> None:
    async def main() -> None:
        runner, url, seen = await _flaky_server(fail_first=100, status=503)
        client = ChatClient([url], max_retries=2, retry_backoff_s=0.01)
        with pytest.raises(LLMError) as err:
            await client.chat([{"role": "user", "content": "hi"}])
        assert err.value.kind == "llm_unavailable" and "HTTP 503" in str(err.value) and "after 3 attempts" in str(err.value)
        assert seen["n"] == 3
        await runner.cleanup()
        runner, url, seen = await _flaky_server(fail_first=100, status=400)
        client = ChatClient([url], max_retries=2, retry_backoff_s=0.01)
        with pytest.raises(LLMError) as err:
            await client.chat([{"role": "user", "content": "hi"}])
        assert err.value.kind == "llm_http" and seen["n"] == 1
        await client.close()
        await runner.cleanup()

    asyncio.run(main())


def test_dead_endpoint_fails_over_to_live_one() -> None:
    async def main() -> None:
        runner, url, seen = await _flaky_server(fail_first=0, status=200)
        dead = f"http://127.0.0.1:{free_port()}/v1"
        client = ChatClient([dead, url], max_retries=1, retry_backoff_s=0.01)
        results = await asyncio.gather(*(client.chat([{"role": "user", "content": str(i)}]) for i in range(10)))
        assert all(r.endpoint == url for r in results)
        await client.close()
        await runner.cleanup()

    asyncio.run(main())


def test_embedded_engine_serves_concurrent_chats_and_stops(tmp_path: Any) -> None:
    engine = EmbeddedEngine(n_parallel=4, log_dir=tmp_path)
    engine.start()
    try:
        engine.wait_ready(60)
        assert engine.health()

        async def main() -> list[Any]:
            client = ChatClient([engine.base_url], max_retries=0)
            res = await asyncio.gather(*(client.chat([{"role": "user", "content": f"Say a number #{i}"}], max_tokens=8) for i in range(6)))
            await client.close()
            return res

        results = asyncio.run(main())
        assert all(r.completion_tokens > 0 and r.prompt_tokens > 0 for r in results)
    finally:
        engine.stop()
    assert not engine.alive()
    t = time.monotonic()
    assert not engine.health(timeout_s=2)
    assert time.monotonic() - t < 3
