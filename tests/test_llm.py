"""The chat client against real HTTP servers, and the embedded engine's lifecycle."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiohttp import web

from matrix_hpc.services.llm import ChatClient, EmbeddedEngine, LLMError
from matrix_hpc.services.llm.embedded import free_port


async def _serve(chat: Any, port: int | None = None) -> tuple[web.AppRunner, str]:
    """A real HTTP server on loopback whose /v1/chat/completions is ``chat``; (runner, base URL)."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    port = port or free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}/v1"


async def _flaky_server(fail_first: int, status: int, port: int | None = None) -> tuple[web.AppRunner, str, dict[str, int]]:
    seen = {"n": 0}

    async def chat(request: web.Request) -> web.Response:
        seen["n"] += 1
        if seen["n"] <= fail_first:
            return web.Response(status=status, text="busy")
        body = await request.json()
        return web.json_response(
            {
                "choices": [{"message": {"content": f"echo {body['messages'][-1]['content']}"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2},
            }
        )

    runner, url = await _serve(chat, port)
    return runner, url, seen


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


def test_server_down_then_back_on_its_port_costs_no_attempts() -> None:
    # A killed server that a registry restarts on the same port: calls wait for it
    # (up to timeout_s), however many times they find the port closed meanwhile.
    async def main() -> None:
        port = free_port()
        url = f"http://127.0.0.1:{port}/v1"
        client = ChatClient([url], max_retries=0, retry_backoff_s=0.05, timeout_s=20)
        calls = [asyncio.create_task(client.chat([{"role": "user", "content": str(i)}])) for i in range(5)]
        await asyncio.sleep(3.0)  # longer than one look-again period: several refused connections
        assert not any(c.done() for c in calls)
        runner, _, seen = await _flaky_server(fail_first=0, status=200, port=port)
        t0 = time.monotonic()
        results = await asyncio.gather(*calls)
        assert [r.text for r in results] == [f"echo {i}" for i in range(5)] and seen["n"] == 5
        assert time.monotonic() - t0 < 5
        await client.close()
        await runner.cleanup()

    asyncio.run(main())


def test_connections_dropped_mid_request_count_as_attempts_and_name_the_server() -> None:
    # A request that kills its server every time must not hold the task until the deadline.
    async def main() -> None:
        seen = {"n": 0}

        async def chat(request: web.Request) -> web.Response:
            seen["n"] += 1
            assert request.transport is not None
            request.transport.close()  # the server "dies" with the request in flight
            return web.Response(text="never sent")

        runner, url = await _serve(chat)
        client = ChatClient([url], max_retries=1, retry_backoff_s=0.01, timeout_s=60)
        t0 = time.monotonic()
        with pytest.raises(LLMError) as err:
            await client.chat([{"role": "user", "content": "hi"}])
        assert err.value.kind == "llm_unavailable" and f"cannot reach {url}" in str(err.value), err.value
        assert "after 2 attempts" in str(err.value) and seen["n"] == 2 and time.monotonic() - t0 < 10
        await client.close()
        await runner.cleanup()

    asyncio.run(main())


def test_requests_in_flight_to_an_endpoint_that_leaves_routing_fail_over_at_once() -> None:
    # A node that died takes its replica with it and never answers (no RST): when the
    # registry drops that endpoint, calls waiting on it go to another one, not wait timeout_s.
    async def main() -> None:
        hung = {"n": 0}

        async def never(request: web.Request) -> web.Response:
            hung["n"] += 1
            await asyncio.Event().wait()
            return web.Response(text="never")

        dead_runner, dead = await _serve(never)
        runner, url, seen = await _flaky_server(fail_first=0, status=200)
        client = ChatClient([dead], max_retries=2, retry_backoff_s=0.01, timeout_s=600)
        calls = [asyncio.create_task(client.chat([{"role": "user", "content": str(i)}])) for i in range(4)]
        while hung["n"] < 4:
            await asyncio.sleep(0.05)
        client.set_endpoints([url])  # what follow_registry does when the registry drops it
        results = await asyncio.wait_for(asyncio.gather(*calls), 30)  # not the 600 s timeout
        assert [r.text for r in results] == [f"echo {i}" for i in range(4)] and all(r.endpoint == url for r in results)
        assert seen["n"] == 4
        await client.close()
        await runner.cleanup()
        await dead_runner.shutdown()

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


async def _counting_server(delay_s: float = 0.05, status: int = 200) -> tuple[web.AppRunner, str, dict[str, Any]]:
    """Answers after ``delay_s``; records the most requests it had open at once and the auth headers seen."""
    seen: dict[str, Any] = {"n": 0, "open": 0, "peak": 0, "auth": set()}

    async def chat(request: web.Request) -> web.Response:
        seen["n"] += 1
        seen["open"] += 1
        seen["peak"] = max(seen["peak"], seen["open"])
        seen["auth"].add(request.headers.get("Authorization"))
        try:
            await asyncio.sleep(delay_s)
            if status != 200:
                return web.Response(status=status, text="overloaded")
            return web.json_response({"model": "m", "choices": [{"message": {"content": "ok"}}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
        finally:
            seen["open"] -= 1

    runner, url = await _serve(chat)
    return runner, url, seen


def test_least_outstanding_spreads_and_prefer_sticks() -> None:
    async def main() -> None:
        (ra, a, sa), (rb, b, sb) = await _counting_server(), await _counting_server()
        client = ChatClient([a, b])
        await asyncio.gather(*(client.chat([{"role": "user", "content": "x"}]) for _ in range(40)))
        assert sa["n"] == sb["n"] == 20, (sa["n"], sb["n"])  # least outstanding: an even split
        results = await asyncio.gather(*(client.chat([{"role": "user", "content": "x"}], prefer=b) for _ in range(30)))
        assert {r.endpoint for r in results} == {b} and sb["n"] == 50
        assert results[0].model == "m"
        await client.close()
        await ra.cleanup()
        await rb.cleanup()

    asyncio.run(main())


def test_per_endpoint_limit_queues_callers_and_sticky_overflows() -> None:
    async def main() -> None:
        (ra, a, sa), (rb, b, sb) = await _counting_server(0.1), await _counting_server(0.1)
        client = ChatClient([a, b], max_outstanding_per_endpoint=3)
        await asyncio.gather(*(client.chat([{"role": "user", "content": "x"}], prefer=a) for _ in range(30)))
        assert sa["peak"] <= 3 and sb["peak"] <= 3, (sa["peak"], sb["peak"])
        assert sb["n"] > 0  # a full sticky endpoint overflows to the other
        await client.close()
        await ra.cleanup()
        await rb.cleanup()

    asyncio.run(main())


def test_overloaded_endpoint_is_avoided_for_the_backoff() -> None:
    async def main() -> None:
        (ra, busy, sa), (rb, good, sb) = await _counting_server(0.0, status=429), await _counting_server(0.0)
        client = ChatClient([busy, good], max_retries=3, retry_backoff_s=5.0)
        for _ in range(10):
            await client.chat([{"role": "user", "content": "x"}], prefer=busy)
        assert sa["n"] == 1 and sb["n"] == 10, (sa["n"], sb["n"])  # after one 429, busy cools for 5 s
        await client.close()
        await ra.cleanup()
        await rb.cleanup()

    asyncio.run(main())


def test_waits_for_endpoints_to_appear_and_sends_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_LLM_KEY", "sekrit")

    async def main() -> None:
        runner, url, seen = await _counting_server()
        client = ChatClient([], api_key_env="TEST_LLM_KEY", timeout_s=5.0)
        call = asyncio.ensure_future(client.chat([{"role": "user", "content": "x"}]))
        await asyncio.sleep(0.3)
        assert not call.done()  # no endpoint yet: it waits rather than fails
        client.set_endpoints([url])
        res = await asyncio.wait_for(call, 5.0)
        assert res.endpoint == url and seen["auth"] == {"Bearer sekrit"}
        client.set_endpoints([])
        with pytest.raises(LLMError, match="no healthy endpoint"):
            await ChatClient([], timeout_s=0.5).chat([{"role": "user", "content": "x"}])
        await client.close()
        await runner.cleanup()

    asyncio.run(main())


def test_a_restarted_registry_whose_start_failed_tries_again_on_the_next_call() -> None:
    """A registry restarted by Ray starts its endpoints again on the first call; when that
    start fails (e.g. placement timed out), the next call tries again instead of raising the
    old failure for the rest of the run. The registry object is driven in-process: only its
    ``start`` (which would place and start replicas) is replaced, to fail once."""
    from matrix_hpc.services.llm.registry import EndpointRegistry

    reg = object.__new__(EndpointRegistry.__ray_metadata__.modified_class)
    reg.model_key, reg._restarted, reg._started, reg._restart_task = "m", True, False, None
    starts: list[float] = []

    async def start() -> list[Any]:
        starts.append(time.monotonic())
        reg._started = True
        if len(starts) == 1:
            raise RuntimeError("placement group not ready")
        return []

    reg.start = start

    async def calls() -> None:
        with pytest.raises(RuntimeError, match="placement group"):
            await reg._resume()
        await reg._resume()  # raised the first failure again before the fix
        await reg._resume()

    asyncio.run(calls())
    assert len(starts) == 2
