"""The LLM client's connection cap is per actor (one client), across all its endpoints
(issue 20, item 10): ``runtime/limits.py`` sizes ``max_connections`` as the sockets one
actor may hold, so with E endpoints the client must not open E x the cap.

Real aiohttp servers on loopback count the TCP connections they have open (their
``web.Server.connections``: keep-alive ones included) and the requests in progress.
"""

from __future__ import annotations

import asyncio
import random

from aiohttp import web

from matrix_hpc.services.llm import ChatClient
from matrix_hpc.services.llm.embedded import free_port


class Servers:
    """``n`` OpenAI-shaped servers in this loop; peaks are over all of them together."""

    def __init__(self, n: int, delay_s: tuple[float, float]) -> None:
        self.n, self.delay_s = n, delay_s
        self.runners: list[web.AppRunner] = []
        self.urls: list[str] = []
        self.busy = self.peak_busy = self.peak_open = self.served = 0

    def _open(self) -> int:
        return sum(len(r.server.connections) for r in self.runners if r.server is not None)

    async def _chat(self, request: web.Request) -> web.Response:
        self.busy += 1
        self.peak_busy = max(self.peak_busy, self.busy)
        self.peak_open = max(self.peak_open, self._open())
        try:
            await request.read()
            await asyncio.sleep(random.uniform(*self.delay_s))
            self.served += 1
            return web.json_response(
                {"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
            )
        finally:
            self.busy -= 1

    async def start(self) -> Servers:
        for _ in range(self.n):
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self._chat)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            port = free_port()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            self.runners.append(runner)
            self.urls.append(f"http://127.0.0.1:{port}/v1")
        return self

    async def stop(self) -> None:
        for r in self.runners:
            await r.cleanup()


def test_connection_cap_holds_across_every_endpoint_of_a_client() -> None:
    """Three endpoints, a cap of 6 connections, 90 calls at once in three waves: the servers
    never see more than 6 connections open together (before the fix: 6 per endpoint, 18),
    and every call is answered."""
    cap, calls = 6, 90

    async def main() -> Servers:
        servers = await Servers(3, (0.02, 0.08)).start()
        client = ChatClient(servers.urls, max_connections=cap, max_outstanding_per_endpoint=64, timeout_s=60)
        try:
            for wave in range(3):  # later waves find the keep-alive connections of earlier ones
                results = await asyncio.gather(*(client.chat([{"role": "user", "content": f"{wave}-{i}"}], max_tokens=1) for i in range(calls // 3)))
                assert all(r.text == "ok" for r in results)
            assert {u for u, n in client.served.items() if n} == set(servers.urls)  # every endpoint was used
        finally:
            await client.close()
            await servers.stop()
        return servers

    servers = asyncio.run(main())
    assert servers.served == calls
    assert servers.peak_busy <= cap, f"{servers.peak_busy} requests in progress at once with max_connections={cap}"
    assert servers.peak_open <= cap, f"{servers.peak_open} connections open at once with max_connections={cap}"
    assert servers.peak_busy == cap  # the cap is reached, not undershot: 90 calls wanted more


def test_connection_cap_keeps_each_endpoint_its_own_pool() -> None:
    """The cap is shared, the pools are not: an endpoint that leaves routing has its pool
    closed (requests waiting on a dead node's replica fail over at once), and the others'
    connections stay open for reuse."""

    async def main() -> None:
        servers = await Servers(2, (0.01, 0.02)).start()
        client = ChatClient(servers.urls, max_connections=4, timeout_s=30)
        try:
            await asyncio.gather(*(client.chat([{"role": "user", "content": str(i)}], max_tokens=1) for i in range(16)))
            kept = servers.urls[1]
            before = len(servers.runners[1].server.connections)  # type: ignore[union-attr]
            client.set_endpoints([kept])
            await asyncio.sleep(0.2)
            assert len(servers.runners[0].server.connections) == 0  # type: ignore[union-attr]  # its pool was closed
            assert len(servers.runners[1].server.connections) == before  # type: ignore[union-attr]
            res = await client.chat([{"role": "user", "content": "again"}], max_tokens=1)
            assert res.endpoint == kept
        finally:
            await client.close()
            await servers.stop()

    asyncio.run(main())
