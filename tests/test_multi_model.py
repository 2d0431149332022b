"""Several models in one run: a model per role, per-role sampling, accounting per model and role.

Real runs (``matrix-hpc run`` with real Ray): two embedded engine processes serving
the teacher's and the student's model; an OpenAI-shaped aiohttp server that keeps
every request body (what sampling reached the server); the tool-use workflow with
its user simulator on a managed model and its assistant on an external endpoint
that wants an API key.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from matrix_hpc.services.llm import EmbeddedEngine

from .conftest import BIN, REPO, job_config, questions, store_records, write_jsonl

pytestmark = pytest.mark.slow


def _run_info(out: Path) -> dict[str, Any]:
    return json.loads((out / "run.json").read_text())


def _engine_log_counts(log: str) -> tuple[int, int]:
    """(requests, generated tokens) as the engine itself logged them: one release per request."""
    text = Path(log).read_text(errors="replace")
    requests = len(re.findall(r"release: .*stop processing", text))
    generated = sum(int(n) for n in re.findall(r"\|\s+eval time =\s+[\d.]+ ms /\s+(\d+) tokens", text))
    return requests, generated


def two_model_collab(tmp_path: Path, rows: list[dict[str, Any]], models: dict[str, Any], **overrides: Any) -> Path:
    """The collab workflow with ``models`` instead of ``llm``: teacher on ``teacher``, student on ``student``."""
    cfg = yaml.safe_load(job_config(tmp_path, write_jsonl(tmp_path / "data.jsonl", rows)).read_text())
    del cfg["llm"]
    cfg["models"] = models
    roles = cfg["workflow"]["roles"]
    roles["teacher"]["model"], roles["student"]["model"] = "teacher", "student"
    for key, value in overrides.items():
        node = cfg
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_teacher_and_student_on_two_embedded_models(tmp_path: Path, run_factory: Any) -> None:
    rows = questions(8)
    engine = {"engine": "embedded", "health_interval_s": 3600.0, "embedded": {"n_parallel": 4, "threads": 1}}
    cfg = two_model_collab(
        tmp_path, rows, {"teacher": {**engine, "max_tokens": 20}, "student": {**engine, "max_tokens": 12}},
        **{"workflow.roles.student.sampling": {"max_tokens": 8, "temperature": 0.2}},
    )  # fmt: skip
    run = run_factory(cfg, "run.progress=log", "run.progress_interval_s=1")
    assert run.wait(400) == 0, run.output[-3000:]
    out = tmp_path / "out"
    records = store_records(out)
    assert sorted(r["id"] for r in records) == sorted(q["id"] for q in rows)
    # The progress line moves with the LLM calls of tasks in flight, per role (the pings'
    # counts), not only with finished tasks: multi-turn dialogues are not mistaken for a hang.
    rates = [re.search(r"\| LLM ([\d.]+) calls/s (\d+) tok/s \(student ([\d.]+)/s (\d+) tok/s, teacher ([\d.]+)/s (\d+) tok/s\)", line)
             for line in run.output.splitlines() if "| in flight " in line]  # fmt: skip
    moving = [m for m in rates if m and all(float(g) > 0 for g in m.groups())]
    assert moving, run.output[-3000:]
    for m in moving:  # the roles add up to the total
        assert abs(float(m[1]) - float(m[3]) - float(m[5])) <= 0.15 and abs(int(m[2]) - int(m[4]) - int(m[6])) <= 2, m[0]
    assert all(r["status"] == "ok" for r in records), [r["error"] for r in records if r["error"]]

    info = _run_info(out)
    endpoints = {e["model"]: e for e in info["llm"]}
    assert set(endpoints) == {"teacher", "student"}
    assert endpoints["teacher"]["pid"] != endpoints["student"]["pid"]  # two engine processes
    assert endpoints["teacher"]["url"] != endpoints["student"]["url"]

    # From the records: every turn of a role went to its model's endpoint, with its sampling.
    turns = [t for r in records for t in r["turns"] if t["model"]]
    for t in turns:
        assert t["model"] == t["role"], t  # the role's model is named like the role here
        assert t["endpoint"] == endpoints[t["model"]]["url"] and t["served_model"] == t["model"], t
        assert (t["max_tokens"], t["temperature"]) == ((20, 0.7) if t["role"] == "teacher" else (8, 0.2)), t
    calls = Counter(t["model"] for t in turns)
    assert calls["teacher"] > 0 and calls["student"] > 0

    # From each engine's own log: it served its model's calls (plus a few health probes), none of the other's.
    for model, e in endpoints.items():
        requests, generated = _engine_log_counts(e["log"])
        probes = requests - calls[model]
        mine = sum(t["completion_tokens"] for t in turns if t["model"] == model)
        print(f"{model}: engine served {requests} requests / {generated} tokens; records: {calls[model]} calls / {mine} tokens")
        assert 0 <= probes <= 3 + e["probes"], (model, requests, calls)
        assert mine <= generated <= mine + probes, (model, generated, mine)

    # Per-model and per-role accounting in run.json adds up to the records, and the summary prints it.
    usage = info["usage"]
    for model in ("teacher", "student"):
        by = usage["by_model"][model]
        assert by["calls"] == calls[model] == usage["by_role"][model]["calls"]
        assert by["completion_tokens"] == sum(t["completion_tokens"] for t in turns if t["model"] == model)
        assert by["prompt_tokens"] == sum(t["prompt_tokens"] for t in turns if t["model"] == model)
        assert by["errors"] == 0 and by["latency_s"] > 0
    assert "model teacher:" in run.output and "model student:" in run.output
    status = subprocess.run([str(BIN / "matrix-hpc"), "status", str(out)], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    for model in ("teacher", "student"):
        by = usage["by_model"][model]
        assert f"model {model}: {by['calls']} calls, {by['prompt_tokens']} prompt + {by['completion_tokens']} completion tokens" in status.stdout
        (line,) = [ln for ln in status.stdout.splitlines() if ln.startswith(f"llm:       model {model}: {endpoints[model]['url']} ")]
        assert "up, 0 restarts, on " in line, status.stdout


class RecordingServer:
    """An OpenAI-shaped chat server on 127.0.0.1 (own thread and loop) that keeps every request body."""

    def __init__(self, reply: str = "The answer is (A).") -> None:
        self.bodies: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        self.reply = reply
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def chat(request: web.Request) -> web.Response:
            body = await request.json()
            self.bodies.append(body)
            self.auth.append(request.headers.get("Authorization"))
            usage = {"prompt_tokens": 11, "completion_tokens": 3}
            return web.json_response({"model": body.get("model"), "choices": [{"message": {"content": self.reply}, "finish_reason": "stop"}], "usage": usage})

        async def start() -> None:
            app = web.Application()
            app.router.add_post("/v1/chat/completions", chat)
            self.runner = web.AppRunner(app)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            port = self.runner.addresses[0][1]
            self.url = f"http://127.0.0.1:{port}/v1"
            self._ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture
def recording_server() -> Iterator[RecordingServer]:
    server = RecordingServer()
    yield server
    server.close()


def test_per_role_sampling_reaches_the_server_and_is_recorded(
    tmp_path: Path, run_factory: Any, recording_server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "sk-test-" + os.urandom(8).hex()
    monkeypatch.setenv("TEACHER_API_KEY", secret)
    rows = questions(4)
    url = recording_server.url
    teacher_sampling = {"max_tokens": 7, "temperature": 0.1, "top_p": 0.5, "stop": ["\n\n", "Student:"], "seed": 3, "extra": {"top_k": 5}}
    cfg = two_model_collab(
        tmp_path, rows,
        {"teacher": {"engine": "external", "base_urls": [url], "model": "served-teacher", "max_tokens": 99, "api_key_env": "TEACHER_API_KEY"},
         "student": {"engine": "external", "base_urls": [url], "temperature": 0.9}},
        **{"workflow.roles.teacher.sampling": teacher_sampling},
    )  # fmt: skip
    run = run_factory(cfg)
    assert run.wait(300) == 0, run.output[-3000:]
    agent_calls = [b for b in recording_server.bodies if b["max_tokens"] != 1]  # health probes ask for one token
    by_model = {name: [b for b in agent_calls if b["model"] == name] for name in ("served-teacher", "student")}
    assert by_model["served-teacher"] and by_model["student"], Counter(b["model"] for b in agent_calls)
    assert len(agent_calls) == sum(map(len, by_model.values()))  # no call asked for another name
    auth = Counter((b["model"], a) for b, a in zip(recording_server.bodies, recording_server.auth))
    assert set(auth) == {("served-teacher", f"Bearer {secret}"), ("student", None)}, auth  # each model its own key
    for body in by_model["served-teacher"]:
        assert {k: body.get(k) for k in ("max_tokens", "temperature", "top_p", "stop", "seed", "top_k")} == {
            "max_tokens": 7,
            "temperature": 0.1,
            "top_p": 0.5,
            "stop": ["\n\n", "Student:"],
            "seed": 3,
            "top_k": 5,
        }
    for body in by_model["student"]:  # no role sampling: the model's defaults, nothing else sent
        assert (body["max_tokens"], body["temperature"]) == (256, 0.9) and not {"top_p", "stop", "seed", "top_k"} & set(body), body

    records = store_records(tmp_path / "out")
    assert len(records) == len(rows)
    turns = [t for r in records for t in r["turns"] if t["model"]]
    assert {(t["role"], t["model"], t["served_model"], t["max_tokens"], t["temperature"]) for t in turns} == {
        ("teacher", "teacher", "served-teacher", 7, 0.1),
        ("student", "student", "student", 256, 0.9),
    }
    assert len(turns) == len(agent_calls)
    leaked = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaked


def test_tool_use_with_user_simulator_and_assistant_on_different_models(tmp_path: Path, run_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-test-" + os.urandom(8).hex()
    monkeypatch.setenv("ASSISTANT_API_KEY", secret)
    workflow = REPO / "workflows" / "tool_use"
    cfg = yaml.safe_load((workflow / "config.yaml").read_text())
    rows = [json.loads(line) for line in (workflow / "data" / "scenarios.jsonl").read_text().splitlines() if line.strip()][:3]
    cfg["dataset"].update(path=str(write_jsonl(tmp_path / "scenarios.jsonl", rows)), limit=None)
    cfg["output"].update(path=str(tmp_path / "out"), flush_interval_s=0.2)
    cfg["run"].update(progress="log", progress_interval_s=2.0)
    cfg["workflow"]["params"].update(max_turns=1, max_tool_rounds=1)
    root = tmp_path / "sandboxes"
    root.mkdir()
    for p in (tmp_path, root):  # the sandbox user (nobody, when root) must reach its directory
        p.chmod(0o711)
    cfg["sandbox"].update(size=2, root_dir=str(root))
    with EmbeddedEngine(n_parallel=4, threads=1, log_dir=tmp_path / "ext", served_model_name="assistant-llm") as external:
        external.wait_ready(120)
        del cfg["llm"]
        cfg["models"] = {
            "simulator": {"engine": "embedded", "max_tokens": 24, "embedded": {"n_parallel": 4, "threads": 1, "ctx_per_slot": 2048}},
            "assistant": {
                "engine": "external",
                "base_urls": [external.base_url],
                "model": "assistant-llm",
                "api_key_env": "ASSISTANT_API_KEY",
                "max_tokens": 32,
            },
        }
        cfg["workflow"]["roles"]["user"]["model"] = "simulator"
        cfg["workflow"]["roles"]["assistant"]["model"] = "assistant"
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
        run = run_factory(tmp_path / "job.yaml")
        assert run.wait(500) == 0, run.output[-3000:]
        ext_requests, _ = _engine_log_counts(external.log_path)
    out = tmp_path / "out"
    records = store_records(out)
    assert sorted(r["id"] for r in records) == sorted(r["id"] for r in rows)
    turns = [t for r in records for t in r["turns"] if t["model"]]
    endpoints = {e["model"]: e for e in _run_info(out)["llm"]}
    assert endpoints["assistant"]["url"] == external.base_url and endpoints["assistant"]["replica"] is None
    for t in turns:
        assert t["model"] == {"user": "simulator", "assistant": "assistant"}[t["role"]], t
        assert t["endpoint"] == endpoints[t["model"]]["url"], t
    assistant_calls = sum(t["model"] == "assistant" for t in turns)
    assert assistant_calls > 0 and any(t["model"] == "simulator" for t in turns)
    assert assistant_calls <= ext_requests  # the external engine served them (plus the registry's probes)
    usage = _run_info(out)["usage"]["by_model"]
    assert usage["assistant"]["calls"] == assistant_calls
    # The key (sent by the client; this engine ignores it) never reached a saved file.
    leaked = [p for p in out.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaked and "ASSISTANT_API_KEY" in (out / "run.json").read_text()
    assert secret not in run.output
