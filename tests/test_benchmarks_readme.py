"""Every benchmark command the README prints runs, once, at a tiny size.

The commands are read from the README's code blocks, so a renamed flag or a missing
dependency (``pandas`` for the Ray Data baseline) fails here, not on a user's first
try. Tiny-size flags are appended (argparse keeps the last value of a flag); a new
README benchmark without an entry in ``TINY`` fails until it gets one.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

README = (REPO / "README.md").read_text()

TINY: dict[str, list[str]] = {
    "benchmarks.throughput": ["--concurrency", "4", "--tasks", "8", "--repeats", "1", "--scale", "16"],  # the scale rows too, at 16 tasks
    "benchmarks.hops": ["--tasks", "200", "--hops", "2", "--in-flight", "50", "--repeats", "1"],
    "benchmarks.sandbox_exec": ["--execs", "8", "--pool-size", "2", "--concurrency", "1", "2", "--repeats", "1"],
    "benchmarks/gpu_vllm.sh": ["--device", "cpu", "--tasks", "4", "--concurrency", "2", "--max-tokens", "8", "--max-turns", "1", "--repeats", "1"],
}


def readme_commands() -> list[str]:
    """Benchmark command lines in the README's ``bash`` blocks, comments stripped."""
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(("python -m benchmarks.", "benchmarks/")):
                cmds.append(line)
    return cmds


def _key(cmd: str) -> str:
    words = shlex.split(cmd)
    return words[2] if words[0] == "python" else words[0]


def test_readme_lists_the_benchmarks() -> None:
    keys = {_key(c) for c in readme_commands()}
    assert {"benchmarks.throughput", "benchmarks.hops", "benchmarks.sandbox_exec", "benchmarks/gpu_vllm.sh"} <= keys, keys
    assert "make bench" in README and "pip install -e '.[bench]'" in README


def _params() -> list[object]:
    out = []
    for cmd in readme_commands():
        marks = [pytest.mark.slow]
        if _key(cmd) == "benchmarks/gpu_vllm.sh":
            marks.append(pytest.mark.vllm)  # vLLM on CPU stands in for the GPU
        out.append(pytest.param(cmd, marks=marks, id=_key(cmd) + ("-web" if "web_reasoning" in cmd else "")))
    return out


@pytest.mark.timeout(1200)  # tiny, but each starts Ray and an engine: minutes on a loaded 2-core machine
@pytest.mark.parametrize("cmd", _params())
def test_readme_benchmark_command_runs(cmd: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    key = _key(cmd)
    assert key in TINY, f"README benchmark {cmd!r}: add its tiny-size flags to TINY"
    words = shlex.split(cmd)
    if key == "benchmarks.sandbox_exec" and not shutil.which("bwrap"):
        pytest.skip("bubblewrap is not installed (make deb-test)")
    if key == "benchmarks/gpu_vllm.sh":
        # MODEL_DIR [TP] from the README become the converted test model on one "GPU" (CPU).
        model = request.getfixturevalue("hf_model")
        words = [str(REPO / words[0]), model, "1"]
    else:
        words = [sys.executable, *words[1:]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), "MATRIX_HPC_PYTHON": sys.executable}
    # In a temp folder, as a user would run it from anywhere: relative outputs (--json) land there.
    # Output to a file, not a pipe: the engine and Ray outlive a killed driver and would hold a pipe open.
    log = tmp_path / "bench.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([*words, *TINY[key]], cwd=tmp_path, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=900)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever it left behind (engine, Ray)
            except ProcessLookupError:
                pass
    assert rc == 0, f"{cmd}: exit {rc}\n{log.read_text(errors='replace')[-4000:]}"
    if "--json" in words:
        assert (tmp_path / words[words.index("--json") + 1]).stat().st_size > 0


@pytest.fixture(scope="session")
def hf_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The SmolLM2 GGUF as an HF folder for vLLM, in the same cache as test_vllm_server's."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (make vllm)")
    from matrix_hpc.services.llm.convert import convert_gguf

    cache = getattr(request.config, "cache", None)
    out = cache.mkdir("smollm2-hf") if cache is not None else tmp_path_factory.mktemp("smollm2-hf")
    convert_gguf(None, out)
    return str(out)
