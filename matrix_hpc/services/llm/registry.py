"""The endpoint registry: which LLM endpoints are routable now, kept true by probing.

One named async actor per model of a run. It starts the managed replicas, probes every
endpoint with a real one-token generation (a dead engine can still answer
``/health``), takes an endpoint out of routing after ``health_failures``
consecutive failures (at once when its process is gone), restarts a managed
replica and puts it back when it generates again. Agents' clients long-poll
:meth:`EndpointRegistry.endpoints`; the registry is never in a request's path.

Liveness is (the probe succeeded) OR (clients completed requests there recently): a probe
queued behind hundreds of requests is slow, not dead. Each client reports its completions
per endpoint at most every ``REPORT_S`` (one Ray call, none while idle; see
:func:`follow_registry`), and a probe that *timed out* counts as passed when a completion
was reported within the probe's timeout plus two report periods. Any other failure (the
process exited, refused, HTTP error), or a timeout with no completion reported, counts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import aiohttp
import ray
from ray.exceptions import RayError

from ... import metrics
from ...credentials import read_secret
from .client import ChatClient
from .replica import LLMReplica, ReplicaSpec, replica_options
from .status import EndpointStatus

__all__ = ["REPORT_S", "CompletionPace", "EndpointRegistry", "follow_registry", "registry_name"]

log = logging.getLogger(__name__)

REPORT_S = 1.0


class CompletionPace:
    """How far apart an endpoint's completions are reported: a smoothed gap. A busy server on a
    loaded machine (one slot, a long queue, CPUs shared) may complete a request only every
    several seconds; its probes time out behind the queue, and a fixed window after the last
    completion then took it for dead and restarted it. The slack is bounded, so a server that
    hangs after completing slowly is still restarted, later by at most ``MAX_SLACK_S``.

    Before its first completion an endpoint's pace is unknown: a probe queued behind its first
    requests timed out before any completion could vouch for it, and two such probes restarted a
    busy replica on a loaded CI machine. So from when it came up (``since``), it is given the
    slack of the slowest pace; one that hangs before completing anything is restarted that much
    later."""

    MAX_SLACK_S = 60.0

    def __init__(self, since: float = 0.0) -> None:
        self.since = since
        self.last: float | None = None
        self.gap_s: float | None = None

    def observe(self, now: float) -> None:
        if self.last is not None:
            gap = now - self.last
            self.gap_s = gap if self.gap_s is None else 0.5 * self.gap_s + 0.5 * gap
        self.last = now

    def slack_s(self) -> float:
        """Extra time to wait for the next completion: twice the usual gap, bounded."""
        return min(2 * (self.gap_s or 0.0), self.MAX_SLACK_S)

    def busy(self, now: float, probe_s: float) -> bool:
        """Whether a probe that timed out (after ``probe_s``) at ``now`` is excused: completions
        were reported while it waited (allowing for the report period and this pace), or none
        is known yet and the endpoint came up less than ``MAX_SLACK_S`` ago."""
        if self.last is None:
            return now - self.since <= probe_s + self.MAX_SLACK_S
        return now - self.last <= probe_s + 2 * REPORT_S + self.slack_s()


"""How often a client reports its completed requests per endpoint (only when it has some)."""


def registry_name(run_id: str, model: str) -> str:
    return f"{run_id}/__llm__/{model}"


@ray.remote(num_cpus=0, max_restarts=-1)
class EndpointRegistry:
    """Restarted by Ray if it dies (its replicas die with it, as their owner): the new
    incarnation starts them again on the first call. Meanwhile agents' clients keep
    routing to their last known endpoints (see :func:`follow_registry`)."""

    def __init__(
        self,
        run_id: str,
        namespace: str,
        model_key: str,
        specs: list[ReplicaSpec],
        external_urls: list[str],
        model: str,
        api_key_env: str | None = None,
        health_interval_s: float = 5.0,
        health_failures: int = 2,
        max_restarts: int = 10,
        probe_timeout_s: float = 60.0,
        api_key_file: str | None = None,
    ) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.run_id, self.namespace, self.specs, self.model = run_id, namespace, specs, model
        self.model_key = model_key
        metrics.configure(metrics.enabled(), run_id)  # its series (restarts, removals) name the run too
        # The run's key for its managed servers (a file: see matrix_hpc.credentials), else an
        # external endpoint's from its environment variable. Kept in the session's headers only.
        self.api_key_file = api_key_file
        key = read_secret(api_key_file) if api_key_file else os.environ.get(api_key_env) if api_key_env else None
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.interval, self.max_failures, self.max_restarts = health_interval_s, health_failures, max_restarts
        self.probe_timeout = aiohttp.ClientTimeout(total=probe_timeout_s)
        self.replicas: list[Any] = []
        # Keyed by a stable name (the URL of an external endpoint, ``replica-N`` for a managed
        # one): a restarted replica may come back on another port.
        self.states: dict[str, EndpointStatus] = {u.rstrip("/"): EndpointStatus(model_key, u.rstrip("/"), None, served_model=model) for u in external_urls}
        self.version = 0
        self._changed = asyncio.Event()
        self._wake: dict[str, asyncio.Event] = {}
        self._pace: dict[str, CompletionPace] = {}  # by URL: how far apart its completions come
        self._session: aiohttp.ClientSession | None = None
        self._started = False
        self._restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self._restart_task: asyncio.Task[list[EndpointStatus]] | None = None

    async def _resume(self) -> None:
        """After a crash and restart by Ray: start supervising again, once; every caller
        waits for it, so none reads a half-started set of endpoints."""
        if not self._restarted:
            return
        task = self._restart_task
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            log.warning("registry of model %s: starting its endpoints again failed (%s); trying again", self.model_key, task.exception())
            self._restart_task, self._started = None, False
        if self._restart_task is None and not self._started:
            log.warning("registry of model %s restarted after a crash; starting its endpoints again", self.model_key)
            self._restart_task = asyncio.get_running_loop().create_task(self.start())
        if self._restart_task is not None:
            await asyncio.shield(self._restart_task)

    async def start(self) -> list[EndpointStatus]:
        """Start every managed replica (in parallel), then supervise all endpoints.

        A replica that fails to start is reported (logged once, ``down`` in the status with
        its error) and restarted by its watch like one that died; the others are served.
        Only a first start with no endpoint up at all fails (a restarted registry keeps
        trying: its clients keep their last endpoints meanwhile)."""
        self._started = True
        await self.place()
        started = await asyncio.gather(*(r.start.remote() for r in self.replicas), return_exceptions=True)
        self._session = aiohttp.ClientSession(timeout=self.probe_timeout, headers=self._headers)
        # An external endpoint is "up" only once it answered a probe (a managed replica's
        # start already waited for a real generation); until then it is not routed to.
        external = [st for st in self.states.values() if st.replica is None]
        for st, (error, _) in zip(external, await asyncio.gather(*(self._probe(st.url) for st in external))):
            st.probes += 1
            if error is None:
                st.last_ok_at = time.time()
            else:
                st.state, st.failures, st.last_error = "down", 1, error
        for i, url in enumerate(started):
            if isinstance(url, BaseException):
                self.states[f"replica-{i}"] = await self._failed_start(i, url)
            else:
                self.states[f"replica-{i}"] = EndpointStatus(
                    self.model_key, url, i, last_ok_at=time.time(), served_model=self.model, api_key_file=self.api_key_file
                )
        failed = [e for e in started if isinstance(e, BaseException)]
        if failed and not self._restarted and not self._routable():
            raise failed[0]  # nothing to serve at the run's start: say why (the driver stops the run)
        for key, st in self.states.items():
            self._pace[st.url] = CompletionPace(time.time())
            self._wake[key] = asyncio.Event()
            asyncio.get_running_loop().create_task(self._watch(key))
        self._bump()
        return await self.status()

    async def _failed_start(self, i: int, exc: BaseException) -> EndpointStatus:
        """The status of replica ``i`` whose start raised ``exc``: down, with why (said once here)."""
        why = f"start failed: {_last_line(exc)}"
        log.error("model %s: replica %d did not start (%s); the model's other endpoints are served and its watch restarts it", self.model_key, i, why)
        try:  # the URL it was to serve (its port is chosen when it starts)
            url = (await asyncio.wait_for(self.replicas[i].info.remote(), 10.0)).url or ""
        except (TimeoutError, RayError):
            url = ""
        return EndpointStatus(
            self.model_key, url or f"(replica {i} not started)", i, state="down", failures=1, last_error=why, served_model=self.model, api_key_file=self.api_key_file,
        )  # fmt: skip

    async def place(self, timeout_s: float = 120.0) -> list[str]:
        """Create the replica actors and wait until Ray has placed each (holding its GPUs); their hosts.

        Separate from :meth:`start` so the driver can place models with bigger replicas first.
        """
        if not self.replicas:
            self.replicas = [
                LLMReplica.options(**replica_options(spec, f"{registry_name(self.run_id, self.model_key)}/{i}", self.namespace)).remote(spec, i)
                for i, spec in enumerate(self.specs)
            ]
        try:
            infos = await asyncio.wait_for(asyncio.gather(*(r.info.remote() for r in self.replicas)), timeout_s)
        except TimeoutError:
            gpus = self.specs[0].gpus if self.specs else 0
            raise RuntimeError(
                f"model {self.model_key}: Ray placed no node for a replica needing {gpus} GPU(s) within {timeout_s:.0f}s (too few free GPUs on the GPU nodes?)"
            ) from None
        return [i.host for i in infos]

    def _routable(self) -> list[str]:
        return [s.url for s in self.states.values() if s.state == "up"]

    def _bump(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def endpoints(self, known_version: int = -1, wait_s: float = 0.0) -> tuple[int, list[str]]:
        """The routable endpoints; waits up to ``wait_s`` while they are still as in ``known_version``."""
        await self._resume()
        if known_version == self.version and wait_s > 0:
            try:
                await asyncio.wait_for(self._changed.wait(), wait_s)
            except TimeoutError:  # not the builtin before Python 3.11
                pass
        return self.version, self._routable()

    async def report_error(self, url: str) -> None:
        """A client could not reach ``url``: probe it now rather than at the next interval."""
        await self._resume()
        for key, st in self.states.items():
            if st.url == url.rstrip("/"):
                self._wake[key].set()

    async def report_completions(self, counts: dict[str, int]) -> None:
        """A client completed ``counts[url]`` requests at each URL since its last report."""
        await self._resume()
        now = time.time()
        for st in self.states.values():
            n = counts.get(st.url)
            if n:
                st.completed += n
                st.last_completed_at = now
                self._pace.setdefault(st.url, CompletionPace(now)).observe(now)

    def _busy(self, st: EndpointStatus) -> bool:
        """A timed-out probe of ``st`` is excused by its pace (see :class:`CompletionPace`)."""
        pace = self._pace.get(st.url)
        return pace is not None and pace.busy(time.time(), self.probe_timeout.total or 0.0)

    async def status(self) -> list[EndpointStatus]:
        out = []
        for st in self.states.values():
            row = EndpointStatus(**{**st.to_dict()})
            if st.replica is not None:
                try:
                    row = row.with_replica(await self.replicas[st.replica].info.remote())
                except RayError as exc:
                    row.info_error = type(exc).__name__
            out.append(row)
        return out

    async def _probe(self, url: str) -> tuple[str | None, bool]:
        """(None when ``url`` completes a one-token generation, else why not; whether it timed out)."""
        assert self._session is not None
        body = {"model": self.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
        try:
            async with self._session.post(f"{url}/chat/completions", json=body) as resp:
                if resp.status != 200:
                    return f"HTTP {resp.status}", False
                data = await resp.json(content_type=None)
                return (None if isinstance(data, dict) and data.get("choices") else "no choices in the reply"), False
        except TimeoutError:  # not the builtin before Python 3.11
            return f"no reply in {self.probe_timeout.total:.0f}s", True
        except (aiohttp.ClientError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}", False

    async def _process_gone(self, st: EndpointStatus) -> bool:
        if st.replica is None:
            return False
        try:
            return not await self.replicas[st.replica].alive.remote()
        except RayError:
            return True

    async def _watch(self, key: str) -> None:
        st, wake = self.states[key], self._wake[key]
        busy = False  # in a run of timed-out probes excused by completions (logged once)
        while True:
            try:
                await asyncio.wait_for(wake.wait(), self.interval)
            except TimeoutError:  # not the builtin before Python 3.11
                pass
            wake.clear()
            if st.state == "failed":
                return
            try:
                busy = await self._check(st, busy)
            except Exception:  # an endpoint's supervision must outlive any surprise (it would end silently)
                log.exception("health check of %s failed; checking again in %.0fs", st.url, self.interval)

    async def _check(self, st: EndpointStatus, busy: bool) -> bool:
        """Probe ``st`` once; take it out of routing, restart it or put it back. Returns
        whether it is in a run of busy (timed out but completing) probes."""
        gone = await self._process_gone(st)
        error, timed_out = ("the server process exited", False) if gone else await self._probe(st.url)
        st.probes += 1
        if error is not None and timed_out and self._busy(st):
            if not busy:
                log.info("%s: probe got %s but requests keep completing there: busy, not dead", st.url, error)
            busy, error = True, None
            st.slow_probes += 1
        else:
            busy = False
        if error is None:
            st.failures, st.last_ok_at = 0, time.time()
            if st.state != "up":
                log.info("%s is back in routing", st.url)
                st.state = "up"
                self._bump()
            return busy
        st.failures += 1
        st.last_error = error
        if st.state == "up" and (gone or st.failures >= self.max_failures):
            log.warning("%s leaves routing: %s", st.url, error)
            st.state = "down"
            metrics.inc("llm_routing_removals", 1, self.model_key, st.url)
            self._bump()
        if st.state == "down" and st.replica is not None:
            await self._restart(st)
        return busy

    async def _restart(self, st: EndpointStatus) -> None:
        if st.restarts >= self.max_restarts:
            log.error("%s: gave up after %d restarts (%s)", st.url, st.restarts, st.last_error)
            st.state = "failed"
            return
        st.state, st.restarts = "restarting", st.restarts + 1
        st.last_completed_at = None  # the old process's completions do not vouch for the new one
        metrics.inc("llm_replica_restarts", 1, self.model_key, st.url)
        log.warning("restarting replica %d (%s), restart %d", st.replica, st.url, st.restarts)
        try:
            url = await self.replicas[st.replica].start.remote()  # type: ignore[index]
        except RayError as exc:  # start-up failed; the next round tries again
            st.state, st.last_error = "down", f"restart failed: {exc}"
            log.error("%s: restart failed: %s", st.url, exc)
            return
        st.url = url  # normally the same; another port if the old one was taken meanwhile
        self._pace[url] = CompletionPace(time.time())  # the old process's pace says nothing of the new one
        st.state, st.failures, st.last_ok_at, st.restarted_at = "up", 0, time.time(), time.time()
        self._bump()
        log.info("replica %d is back at %s", st.replica, url)

    async def stop(self) -> None:
        await asyncio.gather(*(r.stop.remote() for r in self.replicas), return_exceptions=True)
        if self._session is not None:
            await self._session.close()


def _last_line(exc: BaseException) -> str:
    """The innermost cause's last line (a RayTaskError carries the remote traceback)."""
    cause = getattr(exc, "cause", None) or exc
    return (str(cause).strip().splitlines() or [type(cause).__name__])[-1]


async def follow_registry(client: ChatClient, registry: Any, wait_s: float = 10.0) -> None:
    """Keep ``client``'s endpoints equal to the registry's routable set, and report its
    completions to the registry (run as a task)."""
    reporter = asyncio.get_running_loop().create_task(_report_completions(client, registry))
    version = -1
    try:
        while True:
            try:
                version, urls = await registry.endpoints.remote(version, wait_s)
            except RayError as exc:  # the registry is restarting or the run is ending
                log.debug("registry not reachable: %s", exc)
                await asyncio.sleep(1.0)
                continue
            if urls != client.base_urls:
                log.info("LLM endpoints now: %s", ", ".join(urls) or "none")
                client.set_endpoints(urls)
    finally:
        reporter.cancel()


async def _report_completions(client: ChatClient, registry: Any, period_s: float = REPORT_S) -> None:
    """Every ``period_s``, send the registry the requests ``client`` completed per endpoint
    since the last report (its ``served`` counts, kept per request anyway): one Ray call per
    period while requests complete, none while idle."""
    sent = dict(client.served)
    while True:
        await asyncio.sleep(period_s)
        now = dict(client.served)
        delta = {url: n - sent.get(url, 0) for url, n in now.items() if n > sent.get(url, 0)}
        if not delta:
            continue
        sent = now
        try:
            await asyncio.wait_for(registry.report_completions.remote(delta), 10 * period_s)
        except (TimeoutError, RayError) as exc:  # restarting registry: this report is lost, the next one counts
            log.debug("completions not reported: %s", exc)
