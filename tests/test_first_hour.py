"""A new user's first hour (issue 15): the usual mistakes, each answered by one line.

Each test does what the user did: runs ``matrix-hpc`` as a subprocess and checks its
exit status and the exact line it printed (these all fail before Ray starts: fast).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import BIN, REPO

CONFIG = REPO / "workflows" / "collab_reasoning" / "config.yaml"
ROOT = os.geteuid() == 0 and shutil.which("unshare") is not None


def cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "matrix-hpc"), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def one_line(res: subprocess.CompletedProcess[str]) -> str:
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


# --- output.path ------------------------------------------------------------


def test_output_under_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "notes").write_text("a file, not a folder")
    res = cli("run", str(CONFIG), f"output.path={tmp_path}/notes/out")
    assert res.returncode == 2
    assert one_line(res) == f"matrix-hpc: error: output.path: {tmp_path}/notes/out is under {tmp_path}/notes, which is a file, not a folder"
    res = cli("run", str(CONFIG), f"output.path={tmp_path}/notes")
    assert res.returncode == 2
    assert one_line(res) == f"matrix-hpc: error: output.path: {tmp_path}/notes is a file, not a folder"


def test_output_that_cannot_be_created() -> None:
    res = cli("run", str(CONFIG), "output.path=/proc/out")
    assert res.returncode == 2
    assert one_line(res) == "matrix-hpc: error: output.path: cannot create /proc/out: no such file or directory"


def _in_private_mount(tmp_path: Path, script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` (sh) with a private tmpfs on $RO, in its own mount namespace."""
    ro = tmp_path / "ro"
    ro.mkdir()
    env = {**os.environ, "RO": str(ro), "MHPC": str(BIN / "matrix-hpc"), "PY": sys.executable, "CONFIG": str(CONFIG)}
    full = 'set -e; mount -t tmpfs -o size=8m tmpfs "$RO"; ' + script
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", full], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.skipif(not ROOT, reason="needs root and unshare (private mount namespace)")
def test_output_on_a_read_only_filesystem(tmp_path: Path) -> None:
    res = _in_private_mount(tmp_path, 'mount -o remount,ro "$RO"; "$MHPC" run "$CONFIG" output.path="$RO/out" || echo "rc=$?"')
    assert res.stdout.strip() == "rc=2", res.stderr
    assert one_line(res) == f"matrix-hpc: error: output.path: cannot create {tmp_path}/ro/out: read-only file system"


@pytest.mark.skipif(not ROOT, reason="needs root and unshare (private mount namespace)")
def test_resume_on_a_read_only_filesystem(tmp_path: Path) -> None:
    """A store made by an earlier run, later found on a read-only mount: refused before anything starts."""
    make_store = '"$PY" -c "import sys; from matrix_hpc.store import StoreWriter; StoreWriter(sys.argv[1]).close()" "$RO/out"; '
    res = _in_private_mount(tmp_path, make_store + 'mount -o remount,ro "$RO"; "$MHPC" run "$CONFIG" output.path="$RO/out" || echo "rc=$?"')
    assert res.stdout.strip() == "rc=2", res.stderr
    assert one_line(res) == f"matrix-hpc: error: output.path: cannot write to {tmp_path}/ro/out: read-only file system"


# --- one rule for relative paths ---------------------------------------------


def test_relative_paths_follow_where_they_were_written(tmp_path: Path) -> None:
    """In the config file: from the file's folder; as key=value: from the current folder."""
    cfg_dir, cwd = tmp_path / "configs", tmp_path / "work"
    cfg_dir.mkdir()
    cwd.mkdir()
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["dataset"]["path"] = "data/rows.jsonl"
    cfg["output"]["path"] = "blocked/out"
    (cfg_dir / "job.yaml").write_text(yaml.safe_dump(cfg))
    (cfg_dir / "blocked").write_text("")  # a file where the output folder's parent should be
    (cwd / "blocked").write_text("")

    res = cli("run", str(cfg_dir / "job.yaml"), cwd=cwd)  # from the file: next to the file
    assert res.returncode == 2
    assert one_line(res) == f"matrix-hpc: error: output.path: {cfg_dir}/blocked/out is under {cfg_dir}/blocked, which is a file, not a folder"
    res = cli("run", str(cfg_dir / "job.yaml"), "output.path=blocked/out", cwd=cwd)  # from the command line: here
    assert res.returncode == 2
    assert one_line(res) == f"matrix-hpc: error: output.path: {cwd}/blocked/out is under {cwd}/blocked, which is a file, not a folder"
    res = cli("run", str(cfg_dir / "job.yaml"), "output.path=out", cwd=cwd)
    assert res.returncode == 1
    assert one_line(res) == f"matrix-hpc: error: dataset.path: no such file {cfg_dir}/data/rows.jsonl"
    res = cli("run", str(cfg_dir / "job.yaml"), "output.path=out", "dataset.path=rows.jsonl", cwd=cwd)
    assert one_line(res) == f"matrix-hpc: error: dataset.path: no such file {cwd}/rows.jsonl"


# --- settings that were silently ignored -----------------------------------


def test_base_urls_with_a_managed_engine_is_refused() -> None:
    res = cli("run", str(CONFIG), "llm.base_urls=[http://127.0.0.1:9/v1]")
    assert res.returncode == 2
    assert one_line(res) == (
        "matrix-hpc: config error: llm.base_urls: only used with llm.engine: external "
        "(this config's engine is 'embedded'); remove it or set llm.engine=external"
    )
