"""Async OpenAI-compatible chat client: connection reuse, timeouts, retries, usage.

One :class:`ChatClient` per agent actor; it spreads requests over the configured
base URLs (fewest outstanding requests first) and retries 429, 5xx, timeouts and
connection errors with exponential backoff before raising :class:`LLMError`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

__all__ = ["ChatClient", "ChatResult", "LLMError", "Message"]

log = logging.getLogger(__name__)

Message = dict[str, str]  # {"role": ..., "content": ...}, the OpenAI wire shape

_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class LLMError(RuntimeError):
    """A chat call failed for good; ``kind`` is a short category for the record."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(slots=True)
class ChatResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    endpoint: str
    finish_reason: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    """OpenAI-format calls (``{"id", "type": "function", "function": {"name", "arguments"}}``), if any."""


class ChatClient:
    def __init__(
        self,
        base_urls: list[str],
        model: str = "default",
        api_key_env: str | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 3,
        retry_backoff_s: float = 1.0,
        max_connections: int = 64,
    ) -> None:
        if not base_urls:
            raise ValueError("ChatClient needs at least one base URL")
        self.base_urls = [u.rstrip("/") for u in base_urls]
        self.model = model
        self._api_key = os.environ.get(api_key_env) if api_key_env else None
        if api_key_env and not self._api_key:
            log.warning("environment variable %s (llm.api_key_env) is not set", api_key_env)
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.max_connections = max_connections
        self._outstanding = {u: 0 for u in self.base_urls}
        self._session: aiohttp.ClientSession | None = None

    def _pick(self, exclude: str | None) -> str:
        choices = [u for u in self.base_urls if u != exclude] or self.base_urls
        low = min(self._outstanding[u] for u in choices)
        return random.choice([u for u in choices if self._outstanding[u] == low])

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            connector = aiohttp.TCPConnector(limit=self.max_connections)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self.timeout, headers=headers)
        return self._session

    async def chat(self, messages: list[Message], max_tokens: int = 256, temperature: float = 0.7, **extra: Any) -> ChatResult:
        """One chat completion, retried on transient failures.

        ``extra`` goes into the request body as is, e.g. ``tools=[...]`` and
        ``tool_choice="auto"`` (OpenAI format); the calls come back in ``tool_calls``.
        """
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature, **extra}
        session = await self._get_session()
        last_url: str | None = None
        last_error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = self.retry_backoff_s * 2 ** (attempt - 1)
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            url = self._pick(exclude=last_url)
            last_url = url
            self._outstanding[url] += 1
            started = time.monotonic()
            try:
                async with session.post(f"{url}/chat/completions", json=body) as resp:
                    if resp.status in _RETRY_STATUS:
                        last_error = f"HTTP {resp.status} from {url}: {(await resp.text())[:200]}"
                        continue
                    if resp.status != 200:
                        raise LLMError("llm_http", f"HTTP {resp.status} from {url}: {(await resp.text())[:200]}")
                    data = await resp.json(content_type=None)
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                last_error = f"cannot reach {url}: {exc.__class__.__name__}: {exc}"
                continue
            except asyncio.TimeoutError:
                last_error = f"timed out after {self.timeout.total}s waiting for {url}"
                continue
            finally:
                self._outstanding[url] -= 1
            return self._parse(data, url, time.monotonic() - started)
        raise LLMError("llm_unavailable", f"{last_error} (gave up after {self.max_retries + 1} attempts)")

    @staticmethod
    def _parse(data: dict[str, Any], url: str, latency: float) -> ChatResult:
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
            tool_calls = choice["message"].get("tool_calls") or None
        except (KeyError, IndexError, TypeError, AttributeError):
            raise LLMError("llm_bad_response", f"unexpected response from {url}: {str(data)[:200]}") from None
        usage = data.get("usage") or {}
        return ChatResult(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            latency_s=latency,
            endpoint=url,
            finish_reason=choice.get("finish_reason"),
            tool_calls=[c for c in tool_calls if isinstance(c, dict)] if isinstance(tool_calls, list) else None,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
