"""Two vLLM models in one run (the CPU build; the same weights under two served names).

One model's server is SIGKILLed mid-run: only that model's replica restarts, the
other model's server keeps its process and its calls never fail, and every id is
written once.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (make vllm)", allow_module_level=True)

from .conftest import committed_rows, questions, store_records, wait_for
from .test_multi_model import two_model_collab
from .test_vllm_server import START_TIMEOUT_S, hf_model  # noqa: F401 (the session fixture)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


# Its own waits (the first commit, then the run after the kill) govern, not the suite's 600 s
# per test: two vLLM start-ups and a restart on 2 loaded cores took over 600 s on a slow day,
# and the limit killed the run mid-way with no line of its own.
@pytest.mark.timeout(1800)
def test_two_vllm_models_and_one_killed(hf_model: str, tmp_path: Path, run_factory: Any) -> None:  # noqa: F811
    rows = questions(16)
    model = {
        "engine": "vllm", "health_interval_s": 1.0, "max_retries": 2, "retry_backoff_s": 0.5, "timeout_s": 60.0, "max_tokens": 16,
        "vllm": {"model": hf_model, "device": "cpu", "startup_timeout_s": START_TIMEOUT_S, "extra_args": ["--max-num-seqs", "8"]},
    }  # fmt: skip
    # A call waits for a restarting server up to the model's timeout_s (the client's
    # deadline): the teacher's covers a vLLM start-up on 2 shared cores, so no task fails.
    teacher = {**model, "timeout_s": START_TIMEOUT_S}
    # Four tasks in flight at a time: most tasks still need their first (teacher) turn
    # when the first commit lands and the teacher's server is killed.
    cfg = two_model_collab(tmp_path, rows, {"teacher": teacher, "student": model}, **{"run.max_in_flight": 4})
    out = tmp_path / "out"
    run = run_factory(cfg)
    wait_for(lambda: committed_rows(out) >= 1, 600, "first commit", run)
    before = {e["model"]: e for e in json.loads((out / "run.json").read_text())["llm"]}
    assert set(before) == {"teacher", "student"} and before["teacher"]["pid"] != before["student"]["pid"]
    os.kill(before["teacher"]["pid"], signal.SIGKILL)
    assert run.wait(900) == 0, run.output[-3000:]

    records = store_records(out)
    assert sorted(r["id"] for r in records) == sorted(q["id"] for q in rows)  # every id once
    after = {e["model"]: e for e in json.loads((out / "run.json").read_text())["llm"]}
    assert after["teacher"]["restarts"] >= 1 and after["teacher"]["state"] == "up" and after["teacher"]["pid"] != before["teacher"]["pid"]
    assert after["student"]["restarts"] == 0 and after["student"]["pid"] == before["student"]["pid"], after["student"]
    turns = [t for r in records for t in r["turns"] if t["model"]]
    assert all(t["endpoint"] == after[t["model"]]["url"] for t in turns if t["endpoint"])  # each model's own server
    # Nothing failed: the teacher's callers waited for its restart, the student's were never hit.
    assert all(r["status"] == "ok" for r in records), [r["error"] for r in records if r["error"]]
    assert not [t for t in turns if t["error"]]
    assert any(t["started_at"] > after["teacher"]["restarted_at"] for t in turns if t["model"] == "teacher" and t["endpoint"])
    usage = json.loads((out / "run.json").read_text())["usage"]["by_model"]
    assert usage["student"]["errors"] == 0 and usage["teacher"]["calls"] > 0 and usage["student"]["calls"] > 0
