"""The contract of an LLM server the framework manages.

A server is started, waited on until it answers a real generation, probed for
health, and stopped. Backends (the embedded CPU engine now, vLLM later) fill in
``start``/``stop``/``pid``; readiness and health are shared here because a live
``/health`` does not prove a working engine.
"""

from __future__ import annotations

import abc
import json
import logging
import subprocess
import time
import urllib.error
import urllib.request

__all__ = ["LLMServer", "ServerStartError", "probe_generation"]

log = logging.getLogger(__name__)


class ServerStartError(RuntimeError):
    """The server exited or did not become ready in time; the message points at its log."""


def probe_generation(base_url: str, model: str = "default", timeout_s: float = 10.0, api_key: str | None = None) -> bool:
    """True when ``base_url`` completes a one-token chat request."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    req = urllib.request.Request(f"{base_url}/chat/completions", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status == 200 and bool(json.loads(resp.read()).get("choices"))
    except (urllib.error.URLError, OSError, ValueError):
        return False


class LLMServer(abc.ABC):
    """Lifecycle of one OpenAI-compatible server."""

    model: str = "default"
    host: str = "127.0.0.1"
    port: int = 0
    api_key: str | None = None
    """The key requests must carry (``Authorization: Bearer``); None: the server takes none."""
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        """``http://host:port/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        """The server process (for vLLM also the id of its process group)."""
        return self._proc.pid if self._proc else None

    @abc.abstractmethod
    def start(self) -> None:
        """Launch the server process; returns without waiting for readiness."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop the server and wait for its process to exit."""

    @abc.abstractmethod
    def alive(self) -> bool:
        """True while the server process runs."""

    def health(self, timeout_s: float = 10.0) -> bool:
        return self.alive() and probe_generation(self.base_url, self.model, timeout_s, self.api_key)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise ServerStartError(f"{self} exited during start-up; see {self.log_path}")
            if probe_generation(self.base_url, self.model, timeout_s=5.0, api_key=self.api_key):
                log.info("%s ready at %s", self, self.base_url)
                return
            time.sleep(0.2)
        self.stop()
        raise ServerStartError(f"{self} not ready after {timeout_s:.0f}s; see {self.log_path}")

    log_path: str = "<no log>"

    def __enter__(self) -> LLMServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
