"""Commands that only read pay only for what they read: ``--help`` imports neither Ray,
aiohttp nor zarr, and ``status`` or ``show`` of an output folder no Ray and no aiohttp (each
`matrix-hpc` call paid ~2.5 s of CPU for them, to name the errors it might print), while
their one-line errors stay as they were."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import contextlib, io, json, sys
from matrix_hpc.cli import main
err = io.StringIO()
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
    try:
        status = main(sys.argv[1:])
    except SystemExit as exc:
        status = exc.code
print(json.dumps({"status": status, "err": err.getvalue(), "heavy": sorted(m for m in ("ray", "aiohttp", "zarr") if m in sys.modules)}))
"""


def probe(*argv: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_help_imports_no_ray_aiohttp_or_zarr() -> None:
    got = probe("--help")
    assert got["status"] == 0 and got["heavy"] == [], got


@pytest.mark.parametrize("command", [["status"], ["show", "--", "t0"]])
def test_reading_commands_import_no_ray_or_aiohttp_and_keep_their_one_line_error(tmp_path: Path, command: list[str]) -> None:
    got = probe(command[0], str(tmp_path), *command[1:])
    assert got["heavy"] == ["zarr"], got
    assert got["status"] == 1 and got["err"] == f"matrix-hpc: error: {tmp_path}: not a matrix-hpc output folder (no store.json)\n", got


def test_a_config_error_is_still_one_line_with_status_2(tmp_path: Path) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text("workflow: {name: collab_reasoning}\nrun: {max_in_flight: many}\n")
    got = probe("run", str(cfg))
    assert got["status"] == 2 and got["err"].startswith("matrix-hpc: config error: ") and got["err"].count("\n") == 1, got
