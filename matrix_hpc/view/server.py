"""``matrix-hpc view``: the local web server (aiohttp) and its JSON API.

Security: it binds to 127.0.0.1 only, and every request needs the random token
printed in the URL (``?token=``; the page's own requests then carry it in an
HttpOnly, SameSite=Strict cookie scoped to this port); a request without it gets 403.
A Host header that is not a loopback name gets 403 too, token or not: a DNS-rebinding
page (attacker.example resolving to 127.0.0.1) cannot read the API through the
victim's browser. Nothing here writes to the store.

Every read of the store runs on one worker thread (:class:`~.index.StoreIndex` is
not thread safe), so the event loop keeps answering while the index grows.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import secrets
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiohttp import web

from ..stopsignals import StopSignals
from ..store import StoreReader
from .index import StoreIndex
from .query import LazyCache, Query, QueryError, run_query
from .runpage import RunFile, run_summary
from .workflow_metrics import WorkflowMetrics, load_metrics_fn

__all__ = ["Viewer", "make_app", "serve_view"]

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
_FILES = {"app.js": "application/javascript", "app.css": "text/css", "index.html": "text/html"}
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_LOAD_STEP = 16384  # rows of small columns read per step (~20 ms)
_FACET_STEP = 512  # records parsed per background step (~20-50 ms): a query waits at most one step
_QUERY_BUDGET_S = 0.8
_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",  # the token is in the page's URL
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Records hold model output: the page inserts it as text only, and this forbids any script but ours.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
}


def _finite(obj: Any) -> Any:
    """``obj`` with NaN and infinities written as strings (a browser's JSON.parse refuses them)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _json(data: Any, status: int = 200) -> web.Response:
    try:
        body = json.dumps(data, ensure_ascii=False, allow_nan=False, default=str)
    except ValueError:
        body = json.dumps(_finite(data), ensure_ascii=False, allow_nan=False, default=str)
    return web.Response(text=body, status=status, content_type="application/json", headers=_HEADERS)


def _window(n: int) -> int:
    """Records per workflow-metrics point: ~50 points over the store as it is at start."""
    return min(max(n // 50, 10), 2000)


class Viewer:
    """The index of one store, kept current by a background task, and the queries on it."""

    def __init__(self, root: Path, refresh_s: float = 1.0) -> None:
        self.root = Path(root)
        self.refresh_s = refresh_s
        self.run_file = RunFile(self.root)
        self.metrics = WorkflowMetrics(None, 100)
        self.ix = StoreIndex(self.root, on_record=lambda rec: self.metrics.feed(rec))
        self.lazy = LazyCache()
        self.error: str | None = None
        self._summary_cache: dict[str, Any] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="view-index")
        self._task: asyncio.Task[None] | None = None
        self._loaded = asyncio.Event()

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name="view-follow")

    async def ready(self) -> None:
        """Wait for the first load of the index (requests made before it wait for it anyway)."""
        await self._loaded.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _load_metrics(self) -> None:
        fn, error = load_metrics_fn(self.run_file.read())
        self.metrics = WorkflowMetrics(fn, _window(self.ix.n), error)

    async def _follow(self) -> None:
        """Read newly committed rows every ``refresh_s``; parse records in the gaps."""
        metrics_loaded = False
        while True:
            deadline = time.monotonic() + self.refresh_s
            try:
                # In steps, so queries are answered in between: the first page of a million
                # records does not wait for the million.
                while True:
                    generation = self.ix.generation
                    await self.call(self.ix.refresh, _LOAD_STEP)
                    self._loaded.set()
                    if self.ix.generation != generation:  # the store was made again: so are its metric windows
                        metrics_loaded = False
                    if self.ix.caught_up:
                        break
                while await self.call(self.ix.load_numeric, _LOAD_STEP):
                    pass
                if not metrics_loaded:
                    await self.call(self._load_metrics)
                    metrics_loaded = True
                while time.monotonic() < deadline and await self.call(self.ix.facet_step, _FACET_STEP):
                    pass
                self.error = None
            except Exception as exc:  # a store being replaced, a file system hiccup: say it, keep going
                self._loaded.set()
                if self.error is None:
                    log.exception("reading %s failed; retrying", self.root)
                self.error = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(max(0.05, deadline - time.monotonic()))

    # -- API ---------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        out = run_summary(self.ix, self.run_file, self.metrics, self._summary_cache)
        out["index_error"] = self.error
        return out

    def records(self, params: dict[str, str]) -> dict[str, Any]:
        return run_query(self.ix, Query.from_params(params), self.lazy, _QUERY_BUDGET_S)

    def record(self, rid: str, ref: str) -> dict[str, Any] | None:
        hint = None
        if ref and ":" in ref:
            part, _, row = ref.rpartition(":")
            names = [p.name for p in self.ix.parts]
            if part in names and row.isdigit():
                hint = (names.index(part), int(row))
        at = self.ix.find_id(rid, hint)
        if at is None:
            return None
        pi, row = at
        return {"ref": f"{self.ix.parts[pi].name}:{row}", "n": self.ix.offsets()[pi] + row + 1, "record": json.loads(self.ix.record_text(pi, row))}


def make_app(viewer: Viewer, token: str, port_hint: Callable[[], int]) -> web.Application:
    """The aiohttp application: the page, its files, and the JSON API, all behind the guard."""

    def cookie_name() -> str:
        return f"matrix_hpc_view_{port_hint()}"

    @web.middleware
    async def guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        host = request.url.host or ""
        if host not in LOOPBACK_HOSTS:
            return web.Response(status=403, text=f"403: the Host header {request.host!r} is not a loopback name\n", headers=_HEADERS)
        given = request.query.get("token") or request.headers.get("X-Matrix-Token") or request.cookies.get(cookie_name()) or ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            return web.Response(status=403, text="403: open the URL matrix-hpc view printed (it holds the token)\n", headers=_HEADERS)
        response = await handler(request)
        if request.query.get("token"):
            response.set_cookie(cookie_name(), token, httponly=True, samesite="Strict", path="/")
        return response

    async def page(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={**_HEADERS, "Content-Type": _FILES["index.html"]})

    async def static(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in _FILES:
            raise web.HTTPNotFound()
        return web.FileResponse(STATIC / name, headers={**_HEADERS, "Content-Type": _FILES[name]})

    async def api_session(request: web.Request) -> web.Response:
        return _json({"token": token, "output": str(viewer.root), "host": socket.gethostname()})

    async def answer(fn: Callable[..., Any], *args: Any) -> web.Response:
        """``fn``'s result as JSON; a bad parameter is a 400 naming it, anything else a 500 saying what."""
        try:
            return _json(await viewer.call(fn, *args))
        except QueryError as exc:
            return _json({"error": str(exc)}, 400)
        except Exception as exc:  # a chunk that cannot be read, a record that does not parse: the page says it
            log.exception("%s failed", getattr(fn, "__name__", fn))
            return _json({"error": f"{type(exc).__name__}: {exc}"}, 500)

    async def api_run(request: web.Request) -> web.Response:
        return await answer(viewer.summary)

    async def api_records(request: web.Request) -> web.Response:
        return await answer(viewer.records, dict(request.query))

    async def api_record(request: web.Request) -> web.Response:
        rid = request.query.get("id")
        if not rid:
            return _json({"error": "id: required"}, 400)
        response = await answer(viewer.record, rid, request.query.get("ref", ""))
        if response.text == "null":
            return _json({"error": f"no committed record with id {rid!r}"}, 404)
        return response

    app = web.Application(middlewares=[guard])
    app.router.add_get("/", page)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/api/session", api_session)
    app.router.add_get("/api/run", api_run)
    app.router.add_get("/api/records", api_records)
    app.router.add_get("/api/record", api_record)
    return app


async def _serve(root: Path, port: int, token: str, out: Any) -> int:
    viewer = Viewer(root)
    bound: list[int] = [port]
    runner = web.AppRunner(make_app(viewer, token, lambda: bound[0]), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        print(f"matrix-hpc: error: cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    bound[0] = int(runner.addresses[0][1])
    viewer.start()
    url = f"http://127.0.0.1:{bound[0]}/?token={token}"
    out.write(
        f"matrix-hpc view: {root}\n"
        f"    {url}\n"
        f"From another machine: ssh -N -L {bound[0]}:127.0.0.1:{bound[0]} {socket.gethostname()}, then open the URL there. Ctrl-C stops.\n"
    )
    out.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # INT and TERM stop it (matrix_hpc/stopsignals.py); the handler's thread wakes the loop.
    signals = StopSignals(notify=None, serving=True, on_first=lambda _: loop.call_soon_threadsafe(stop.set))
    try:
        await stop.wait()
    finally:
        signals.restore()
        await runner.cleanup()
        await viewer.close()
    return 0


def serve_view(output: str | Path, port: int = 0, out: Any = None) -> int:
    """Serve the viewer of the store at ``output`` until SIGINT/SIGTERM; prints its URL."""
    root = Path(output).resolve()
    StoreReader(root)  # not a store: StoreError, one line from the CLI
    return asyncio.run(_serve(root, port, secrets.token_urlsafe(24), out or sys.stdout))
