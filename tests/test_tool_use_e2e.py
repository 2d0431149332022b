"""`matrix-hpc run workflows/tool_use/config.yaml` end to end on the real embedded engine.

The 135M model rarely writes a tool call, so this checks the mechanics a user relies
on (every scenario id once, a reward and a termination reason per record, tool
runs recorded when there are any); test_tool_use.py drives the tool path itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml

from .conftest import BIN, REPO, store_records

pytestmark = pytest.mark.slow

WORKFLOW = REPO / "workflows" / "tool_use"


def test_tool_use_run_writes_one_graded_record_per_scenario(tmp_path: Path) -> None:
    cfg = yaml.safe_load((WORKFLOW / "config.yaml").read_text())
    cfg["dataset"].update(path=str(WORKFLOW / "data" / "scenarios.jsonl"), limit=4)
    cfg["output"].update(path=str(tmp_path / "out"), flush_interval_s=0.2)
    cfg["llm"]["max_tokens"] = 32
    cfg["llm"]["embedded"]["n_parallel"] = 4
    cfg["run"].update(progress="log", progress_interval_s=2.0)
    params = cfg["workflow"]["params"]
    params.update(max_turns=1, max_tool_rounds=1)
    root = tmp_path / "sandboxes"
    root.mkdir()
    for p in (tmp_path, root):  # the sandbox user (nobody, when root) must reach its directory
        p.chmod(0o711)
    cfg["sandbox"].update(size=2, root_dir=str(root))
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(cfg))

    proc = subprocess.Popen(
        [str(BIN / "matrix-hpc"), "run", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=540)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, out[-3000:]

    expected = [json.loads(line)["id"] for line in (WORKFLOW / "data" / "scenarios.jsonl").read_text().splitlines()[:4]]
    records = store_records(tmp_path / "out")
    assert Counter(r["id"] for r in records) == Counter(expected), out[-2000:]
    tool_runs = 0
    for rec in records:
        assert rec["status"] == "ok", rec["error"]
        res = rec["result"]
        assert res["reward"] in (0.0, 1.0) and res["termination"] in ("user_stop", "max_turns", "transfer")
        assert res["trajectory"][0] == {"role": "assistant", "content": "Hi! How can I help you today?"}
        assert {t["role"] for t in rec["turns"]} <= {"user", "assistant"} and rec["usage"]["completion_tokens"] > 0
        for run in res["tool_execs"]:  # each one a real sandboxed process with its exit status
            assert isinstance(run["exit_code"], int) and run["duration_s"] > 0
        calls = [c for m in res["trajectory"] for c in m.get("tool_calls") or []]
        results = [m for m in res["trajectory"] if m["role"] == "tool"]
        assert len(calls) == len(results) == len(res["tool_execs"]) == res["tool_calls"]
        tool_runs += res["tool_calls"]
    assert "mean_reward=" in out and "run finished" in out
    print(f"tool calls issued by the embedded model over {len(records)} scenarios: {tool_runs}")
