"""The suite's own exit: after in-process Ray, pytest exits with its real status (no
SIGSEGV from Ray's gRPC threads running on into the interpreter's finalization)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

INNER = """
import ray

def test_ray_in_process():
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    assert ray.get(ray.put(1)) == 1
    ray.shutdown()

def test_outcome():
    assert {ok}
"""


@pytest.mark.parametrize("ok", [True, False])
def test_exit_status_after_in_process_ray_is_pytests_own(tmp_path: Path, ok: bool) -> None:
    (tmp_path / "test_inner.py").write_text(INNER.format(ok=ok))
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider", str(tmp_path / "test_inner.py")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == (0 if ok else 1), f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    assert ("2 passed" if ok else "1 failed, 1 passed") in r.stdout, r.stdout[-2000:]
