"""Async OpenAI-compatible chat client: connection reuse, timeouts, retries, usage.

One :class:`ChatClient` per agent actor; it spreads requests over the configured
base URLs (fewest outstanding requests first) and retries 429, 5xx, timeouts and
connection errors with exponential backoff before raising :class:`LLMError`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from ... import metrics
from ...store.token_trace import TokenTrace
from .chat_types import ChatResult, LLMError, Message
from .slots import NoSlot, Slots

__all__ = ["ChatClient", "ChatResult", "LLMError", "Message"]

log = logging.getLogger(__name__)

_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
_RECHECK_S = 2.0  # how long an unreachable endpoint stays out of routing unless listed again
_JSON = {"Content-Type": "application/json"}


class ChatClient:
    """Client-side routing over one model's endpoints.

    * least outstanding requests first, random among ties;
    * ``prefer``: a task's earlier endpoint is used again while it is routable and
      has room (sticky turns reuse that replica's prefix cache);
    * at most ``max_outstanding_per_endpoint`` open requests per endpoint, and at most
      ``max_connections`` over all endpoints together (each endpoint keeps its own pool);
      callers beyond that wait for a slot rather than pile onto an overloaded server;
    * an endpoint that answered 429/503 is avoided for the backoff time;
    * the endpoint set can change under it (:meth:`set_endpoints`, fed by the
      registry): with none routable, a call waits up to ``timeout_s`` for one.
    """

    def __init__(
        self,
        base_urls: list[str],
        model: str = "default",
        api_key_env: str | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 3,
        retry_backoff_s: float = 1.0,
        max_connections: int = 64,
        max_outstanding_per_endpoint: int = 64,
        on_endpoint_error: Callable[[str], None] | None = None,
        metric_tags: tuple[str, str] | None = None,
        api_key: str | None = None,
    ) -> None:
        """``api_key``: the key itself (the run's own servers'); else ``api_key_env`` names the
        variable that holds it (an external endpoint's)."""
        self.model = model
        self.metric_tags = metric_tags
        """(role, model) for this client's metrics (see matrix_hpc.metrics); None: not recorded."""
        self._api_key = api_key or (os.environ.get(api_key_env) if api_key_env else None)
        if api_key_env and not self._api_key:
            log.warning("environment variable %s (llm.api_key_env) is not set", api_key_env)
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.max_connections = max_connections
        self.on_endpoint_error = on_endpoint_error
        # max_connections caps the client's requests over all endpoints together (one actor's
        # sockets, as runtime/limits.py sizes it), not each endpoint's pool: E endpoints opened E x it.
        self.slots = Slots(max_outstanding_per_endpoint, total=max_connections)
        self.served: dict[str, int] = {}
        """Completed requests per endpoint (for reports)."""
        self.completion_tokens = 0
        """Output tokens of the completed requests (the progress line's live LLM rate)."""
        # One session (connection pool) per endpoint: dropping an endpoint closes its pool,
        # which ends the requests still waiting on it (a dead node never answers them).
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._closing: set[asyncio.Task[None]] = set()  # sessions of endpoints that left routing, closing
        self.set_endpoints(base_urls)
        if metric_tags is not None:
            metrics.add_collector(self._collect)

    def _collect(self) -> None:
        role, model = self.metric_tags  # type: ignore[misc]
        for url, n in list(self.slots.outstanding.items()):
            metrics.set_gauge("llm_outstanding", n, role, model, url)
        metrics.set_gauge("llm_waiting", len(self.slots._waiters), role, model)

    def _error(self, url: str, kind: str) -> None:
        if self.metric_tags is not None:
            metrics.inc("llm_errors", 1, *self.metric_tags, url, kind)

    @property
    def base_urls(self) -> list[str]:
        return self.slots.base_urls

    @property
    def per_endpoint(self) -> int:
        return self.slots.per_endpoint

    def set_endpoints(self, urls: list[str]) -> None:
        """Route over ``urls`` from now on. Requests in flight to an endpoint that left are
        cut (they fail over as a dropped connection does) rather than wait up to
        ``timeout_s`` for a server that may be gone with its node."""
        self.slots.set_endpoints(urls)
        for u in self.slots.base_urls:
            self.served.setdefault(u, 0)
        gone = [u for u in self._sessions if u not in self.slots.base_urls]
        if not gone:
            return
        loop = asyncio.get_running_loop()  # sessions exist only once chat() ran on a loop
        for u in gone:
            if self.slots.outstanding.get(u):
                log.info("cutting %d request(s) in flight to %s: it left routing", self.slots.outstanding[u], u)
            # Kept until done: the loop holds tasks weakly, and a closing session must not be collected half-way.
            task = loop.create_task(self._sessions.pop(u).close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _acquire(self, prefer: str | None, exclude: str | None, deadline: float) -> str:
        try:
            return await self.slots.acquire(prefer, exclude, deadline)
        except NoSlot as exc:
            what = "no healthy endpoint (all down, unreachable or restarting)" if exc.unreachable else "every endpoint stayed at its request limit"
            raise LLMError("llm_unavailable", f"{what} for {self.timeout.total:.0f}s") from None

    def _session_for(self, url: str) -> aiohttp.ClientSession:
        session = self._sessions.get(url)
        if session is None or session.closed:
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            connector = aiohttp.TCPConnector(limit=self.max_connections)
            session = self._sessions[url] = aiohttp.ClientSession(connector=connector, timeout=self.timeout, headers=headers)
        return session

    async def chat(self, messages: list[Message], max_tokens: int = 256, temperature: float = 0.7, prefer: str | None = None, **extra: Any) -> ChatResult:
        """One chat completion, retried on transient failures.

        ``prefer``: the endpoint to use if it can take the request (sticky routing).
        ``extra`` goes into the request body as is, e.g. ``tools=[...]`` and
        ``tool_choice="auto"`` (OpenAI format); the calls come back in ``tool_calls``.
        """
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature, **extra}
        # Encoded once for every attempt, and sent as bytes: aiohttp's ``json=`` builds a payload object per try.
        payload = json.dumps(body).encode()
        deadline = time.monotonic() + (self.timeout.total or 120.0)
        last_url: str | None = None
        last_error = ""
        attempt = 0  # failed answers count against max_retries; refused connections against the deadline
        refused = False  # the last try found nothing listening: _acquire already waits, no back-off
        while attempt <= self.max_retries:
            if attempt and not refused and not self.slots.has_alternative(last_url):  # fail over at once; back off only on the same server
                delay = self.retry_backoff_s * 2 ** (attempt - 1)
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            try:
                url = await self._acquire(prefer if last_url is None else None, last_url, deadline)
            except LLMError as exc:
                raise LLMError(exc.kind, f"{exc}; last error: {last_error}" if last_error else str(exc)) from None
            last_url, refused = url, False
            started = time.monotonic()
            try:
                async with self._session_for(url).post(f"{url}/chat/completions", data=payload, headers=_JSON) as resp:
                    if resp.status in _RETRY_STATUS:
                        self._error(url, "http_429" if resp.status == 429 else f"http_{resp.status // 100}xx")
                        last_error = f"HTTP {resp.status} from {url}: {(await resp.text(errors='replace'))[:200]}"
                        if resp.status in (429, 503):  # overloaded: let it drain
                            self.slots.cool_until[url] = time.monotonic() + self.retry_backoff_s * 2**attempt
                        attempt += 1
                        continue
                    if resp.status != 200:
                        self._error(url, f"http_{resp.status // 100}xx")
                        raise LLMError("llm_http", f"HTTP {resp.status} from {url}: {(await resp.text(errors='replace'))[:200]}")
                    raw = await resp.read()
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                last_error = f"cannot reach {url}: {exc.__class__.__name__}: {exc}"
                # Leave the server out of routing for a while; the registry probes it now
                # and lists it again once restarted. Refused connections (nothing listening:
                # killed, restarting) wait for it up to the deadline; a connection dropped
                # mid-request counts as an attempt, since the request itself may be the cause.
                self.slots.mark_unreachable(url, _RECHECK_S)
                refused = isinstance(exc, aiohttp.ClientConnectorError)
                self._error(url, "refused" if refused else "connection")
                attempt += 0 if refused else 1
                if self.on_endpoint_error is not None:
                    self.on_endpoint_error(url)
                continue
            except TimeoutError:  # not the builtin before Python 3.11
                last_error = f"timed out after {self.timeout.total}s waiting for {url}"
                self._error(url, "timeout")
                attempt += 1
                continue
            finally:
                self.slots.release(url)
            self.served[url] = self.served.get(url, 0) + 1
            result = self._parse(_load(raw, url), url, time.monotonic() - started, self.model)
            self.completion_tokens += result.completion_tokens
            if self.metric_tags is not None:
                role, model = self.metric_tags
                metrics.inc("llm_requests", 1, role, model, url)
                metrics.observe("llm_latency_seconds", result.latency_s, role, model)
                metrics.inc("llm_tokens", result.prompt_tokens, role, model, "in")
                metrics.inc("llm_tokens", result.completion_tokens, role, model, "out")
            return result
        raise LLMError("llm_unavailable", f"{last_error} (gave up after {self.max_retries + 1} attempts)")

    async def tokenize(self, messages: list[Message], prefer: str | None = None, **fields: Any) -> list[int] | None:
        """The prompt ids the server renders ``messages`` into (vLLM's ``/tokenize``, beside ``/v1``;
        ``fields``: e.g. ``add_generation_prompt``), or None when the server cannot say."""
        tokens = (await self._beside_v1("tokenize", {"messages": messages, **fields}, prefer) or {}).get("tokens")
        return tokens if isinstance(tokens, list) and all(isinstance(t, int) for t in tokens) else None

    async def detokenize(self, tokens: list[int], prefer: str | None = None) -> str | None:
        """The text of ``tokens`` (vLLM's ``/detokenize``), or None when the server cannot say."""
        text = (await self._beside_v1("detokenize", {"tokens": tokens}, prefer) or {}).get("prompt")
        return text if isinstance(text, str) else None

    async def _beside_v1(self, path: str, fields: dict[str, Any], prefer: str | None) -> dict[str, Any] | None:
        """POST ``fields`` to ``/PATH`` beside ``/v1`` on ``prefer`` if it is routed, else the first
        endpoint: a helper's answer, never a failure (None on any error)."""
        if not self.base_urls:
            return None
        url = prefer if prefer in self.base_urls else self.base_urls[0]
        body = json.dumps({"model": self.model, **fields}).encode()
        try:
            async with self._session_for(url).post(f"{url.removesuffix('/v1')}/{path}", data=body, headers=_JSON) as resp:
                if resp.status != 200:
                    log.info("%s on %s: HTTP %d", path, url, resp.status)
                    return None
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.info("%s on %s: %s: %s", path, url, type(exc).__name__, exc)
            return None
        return data if isinstance(data, dict) else None

    @staticmethod
    def _parse(data: Any, url: str, latency: float, model: str) -> ChatResult:
        """The reply's text and usage. A reply with no choice to read, or content that is
        not text, is ``llm_bad_response``; ``content: null`` is text ``""`` (tool-call
        replies have it); usage that is not a count reads as 0 (accounting, not the answer)."""
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
            tool_calls = choice["message"].get("tool_calls") or None
            if not isinstance(text, str):
                raise TypeError(f"content is {type(text).__name__}, not text")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise LLMError("llm_bad_response", f"unexpected response from {url}: {str(data)[:200]}") from None
        usage = data.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        # Only a request that asked for them gets any of these: no cost to the others.
        tokens = _trace(data, choice, url) if (choice.get("logprobs") or "token_ids" in choice or "prompt_token_ids" in data) else None
        return ChatResult(
            text=text,
            prompt_tokens=_count(usage.get("prompt_tokens")),
            completion_tokens=_count(usage.get("completion_tokens")),
            latency_s=latency,
            endpoint=url,
            model=str(data.get("model") or model),
            finish_reason=choice.get("finish_reason") if isinstance(choice.get("finish_reason"), str) else None,
            tool_calls=[c for c in tool_calls if isinstance(c, dict)] if isinstance(tool_calls, list) else None,
            tokens=tokens,
        )

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        await asyncio.gather(*(s.close() for s in sessions))


def _load(raw: bytes, url: str) -> Any:
    """The reply body as JSON. It is UTF-8 (json.loads detects the UTF encodings: no charset
    sniffing as resp.json() does); invalid bytes are kept as the source keeps an input
    line's (``surrogateescape``), so the record replaces and records them (store.textsafe).
    A body that is not JSON (truncated, HTML) is ``llm_bad_response``, not retried."""
    if not raw.strip():
        return None
    try:
        try:
            return json.loads(raw)
        except UnicodeDecodeError:
            return json.loads(raw.decode("utf-8", "surrogateescape"))
    except ValueError as exc:
        raise LLMError("llm_bad_response", f"reply from {url} is not JSON ({exc}; {len(raw)} bytes): {raw[:200].decode('utf-8', 'replace')!r}") from None
    except RecursionError:
        raise LLMError("llm_bad_response", f"reply from {url} is nested too deeply to read ({len(raw)} bytes)") from None


def _token_id(entry: dict[str, Any]) -> int | None:
    """A logprobs entry's token id: llama.cpp's ``id``, or vLLM's ``token_id:N`` (return_tokens_as_token_ids)."""
    tid = entry.get("id")
    if isinstance(tid, int) and not isinstance(tid, bool):
        return tid
    tok = entry.get("token")
    if isinstance(tok, str) and tok.startswith("token_id:"):
        return int(tok[9:])
    return None


def _ids(value: Any, what: str) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise ValueError(f"{what} is not a list of ints")
    return value


def _trace(data: dict[str, Any], choice: dict[str, Any], url: str) -> TokenTrace:
    """The reply's token ids and logprobs (vLLM: ``prompt_token_ids``, the choice's ``token_ids``;
    both engines: ``logprobs.content``, whose entries name their token's id). A field the reply
    lacks stays None; one that is there but malformed makes the reply ``llm_bad_response``."""
    try:
        prompt_ids = _ids(data.get("prompt_token_ids"), "prompt_token_ids")
        ids = _ids(choice.get("token_ids"), "choices[0].token_ids")
        content = (choice.get("logprobs") or {}).get("content")
        logprobs = top_ids = top_lps = None
        if content is not None:
            if not isinstance(content, list):
                raise ValueError("choices[0].logprobs.content is not a list")
            logprobs = [float(e["logprob"]) for e in content]
            if ids is None:
                got = [_token_id(e) for e in content]
                ids = got if all(i is not None for i in got) else None  # type: ignore[assignment]
            tops = [e.get("top_logprobs") or [] for e in content]
            n = max((len(t) for t in tops), default=0)
            if n:  # a step with fewer alternatives is padded: id -1, logprob -inf
                top_ids = [[_token_id(a) if _token_id(a) is not None else -1 for a in t] + [-1] * (n - len(t)) for t in tops]
                top_lps = [[float(a["logprob"]) for a in t] + [float("-inf")] * (n - len(t)) for t in tops]
        if ids is not None and logprobs is not None and len(ids) != len(logprobs):
            raise ValueError(f"{len(ids)} token ids but {len(logprobs)} logprobs")
        return TokenTrace.of(prompt_ids, ids, logprobs, top_ids, top_lps)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise LLMError("llm_bad_response", f"token ids or logprobs from {url} unreadable: {type(exc).__name__}: {exc}") from None


_MAX_COUNT = 1 << 40


def _count(value: Any) -> int:
    """A token count from a reply's usage: a non-negative int (or integral float) below 2**40, else 0."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and 0 <= value < _MAX_COUNT else 0
