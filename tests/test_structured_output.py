"""Structured replies (issue 24 "Structured outputs", issue 26 "Structured replies").

``sampling.response_format`` against the real embedded engine (llama.cpp turns the schema
into a grammar) and a real HTTP server standing for an external endpoint (the request body
it receives, replies that do not match); ``Agent.chat_json``'s extraction; config mistakes
through the ``matrix-hpc`` command (one line, exit 2); one real run end to end.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from aiohttp import web

from matrix_hpc.agents import Agent
from matrix_hpc.config import ModelConfig, SamplingConfig, resolve_sampling
from matrix_hpc.runtime.agent import AgentContext, run_step
from matrix_hpc.runtime.replies import NotJSON, extract_json, parse_reply
from matrix_hpc.runtime.task import Task
from matrix_hpc.services.llm import ChatClient, EmbeddedEngine
from matrix_hpc.services.llm.embedded import free_port

from .conftest import BIN, REPO, store_records, write_jsonl

VERDICT = {
    "title": "verdict",
    "type": "object",
    "properties": {"verdict": {"type": "string", "enum": ["accept", "revise"]}, "score": {"type": "integer", "minimum": 0, "maximum": 10}},
    "required": ["verdict", "score"],
    "additionalProperties": False,
}


def agent(llm: ChatClient, role: str = "critic", **sampling: Any) -> Agent:
    ctx = AgentContext(role=role, llm=llm, sampling=resolve_sampling(ModelConfig(max_tokens=48), SamplingConfig(**sampling)))
    return Agent(ctx)


def task(i: int = 0) -> Task:
    return Task(id=f"t{i}", row={}, next_role="critic")


# --- extraction (pure) ------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [
        ('{"a": 1}', {"a": 1}),
        ("  [1, 2]\n", [1, 2]),
        ('Sure! Here it is:\n```json\n{"a": 1}\n```\nAnything else?', {"a": 1}),
        ('```\n{"a": [1, {"b": 2}]}\n```', {"a": [1, {"b": 2}]}),
        ('```json\n{broken\n```\nthen {"a": 2} and {"c": 3}', {"a": 2}),  # a fence that does not parse is skipped
        ('My verdict is {"verdict": "accept", "score": 7}. {"x": 1}', {"verdict": "accept", "score": 7}),
        ('a {curly} aside, then {"a": "}"}', {"a": "}"}),
    ],
)
def test_extract_json_bare_fenced_or_first_object(text: str, value: Any) -> None:
    assert extract_json(text) == value


@pytest.mark.parametrize("text, why", [("no json here", "has no JSON object"), ("  ", "is empty"), ('{"a": 1', "has no JSON object")])
def test_extract_json_says_why_there_is_none(text: str, why: str) -> None:
    with pytest.raises(NotJSON, match=why):
        extract_json(text)


def test_parse_reply_names_the_kind_and_the_first_mismatch() -> None:
    assert parse_reply('{"verdict": "accept", "score": 3}', VERDICT) == ({"verdict": "accept", "score": 3}, None, None)
    value, kind, problem = parse_reply('{"verdict": "accept", "score": 11}', VERDICT)
    assert (value["score"], kind) == (11, "schema")
    assert problem == "does not match the schema at $.score: 11 is greater than the maximum of 10"
    assert parse_reply("I think it is fine.", VERDICT) == (None, "bad_reply", "has no JSON object")
    assert parse_reply("I think it is fine.", None)[1] == "bad_reply"


# --- the request each engine gets -------------------------------------------------


def test_request_body_is_openai_response_format_that_vllm_and_llama_cpp_take() -> None:
    """vLLM's ResponseFormat: ``type`` text|json_object|json_schema, ``json_schema.name`` required,
    the schema under ``json_schema.schema``; llama.cpp's server reads the same path (and
    ``json_object`` with an optional ``schema``). vLLM is not installed here: this is the body."""
    s = resolve_sampling(None, SamplingConfig(response_format=VERDICT))
    assert s.request_fields()["response_format"] == {"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT}}
    assert hash(s)  # the resolved sampling stays hashable
    untitled = {k: v for k, v in VERDICT.items() if k != "title"}
    assert resolve_sampling(None, SamplingConfig(response_format=untitled)).request_fields()["response_format"]["json_schema"]["name"] == "reply"
    assert resolve_sampling(None, SamplingConfig(response_format="json")).request_fields()["response_format"] == {"type": "json_object"}
    assert "response_format" not in resolve_sampling(None, SamplingConfig()).request_fields()


# --- the real embedded engine -----------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedEngine]:
    eng = EmbeddedEngine(n_parallel=4, ctx_per_slot=512, log_dir=tmp_path_factory.mktemp("engine"))
    eng.start()
    try:
        eng.wait_ready(120)
        yield eng
    finally:
        eng.stop()


def test_embedded_engine_replies_match_the_roles_schema_every_call(engine: EmbeddedEngine) -> None:
    prompts = ["Rate this poem: 'roses are red'.", "Is 2+2=5 a good answer?", "Review: the sky is blue.", "Grade: hello world."]

    async def main() -> list[tuple[str, Any]]:
        client = ChatClient([engine.base_url], model=engine.model, max_retries=0)  # no second chance: every reply must match
        critic = agent(client, response_format=VERDICT, temperature=0.8, max_tokens=160)  # room for any whitespace the grammar allows
        tasks = [task(i) for i in range(len(prompts))]
        try:
            texts = await asyncio.gather(*(critic.chat(t, [{"role": "user", "content": p}]) for t, p in zip(tasks, prompts)))
            values = await asyncio.gather(*(critic.chat_json(t, [{"role": "user", "content": p}]) for t, p in zip(tasks, prompts)))
        finally:
            await client.close()
        assert all(len(t.turns) == 2 and not any(turn.error for turn in t.turns) for t in tasks)
        return list(zip(texts, values))

    for text, value in asyncio.run(main()):
        jsonschema.validate(json.loads(text), VERDICT)  # the reply itself is the JSON: no prose, no fence
        jsonschema.validate(value, VERDICT)


def test_embedded_engine_reply_cut_short_is_retried_then_fails_as_schema(engine: EmbeddedEngine) -> None:
    """Two tokens cannot hold the object: each reply is cut, asked again max_retries times,
    then the task fails as ``schema`` naming the mismatch; every attempt is a turn."""

    async def main() -> Task:
        client = ChatClient([engine.base_url], model=engine.model, max_retries=2)
        critic = agent(client, response_format=VERDICT, max_tokens=2)
        t = task()
        critic.step = lambda t: critic.chat(t, [{"role": "user", "content": "Rate: hello."}])  # type: ignore[method-assign]
        try:
            await run_step(critic, t, "critic", {"critic"})
        finally:
            await client.close()
        return t

    t = asyncio.run(main())
    assert t.error is not None and t.error.kind == "schema", t.error
    assert t.error.message.startswith("role 'critic': 3 replies in a row did not match sampling.response_format; the last reply "), t.error.message
    assert "(cut at max_tokens=2)" in t.error.message, t.error.message
    assert [turn.error for turn in t.turns] == ["schema"] * 3
    assert all(turn.completion_tokens > 0 for turn in t.turns)


# --- an external endpoint (a real HTTP server) ------------------------------------


def test_external_endpoint_gets_the_openai_form_and_a_mismatch_is_asked_again() -> None:
    """The server's first reply does not match, the second does: one retry, both turns kept,
    the first marked ``schema``. Then chat_json on a role without a format: prose is ``bad_reply``."""
    replies = ['{"verdict": "maybe", "score": 3}', '```json\n{"verdict": "revise", "score": 4}\n```', "I would not grade it."]
    bodies: list[dict[str, Any]] = []

    async def chat(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        content = replies[len(bodies) - 1]
        return web.json_response(
            {"choices": [{"message": {"content": content}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 5, "completion_tokens": 9}}
        )

    async def main() -> tuple[Any, Task, Task]:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        client = ChatClient([f"http://127.0.0.1:{port}/v1"], max_retries=3)
        try:
            t = task()
            value = await agent(client, response_format=VERDICT).chat_json(t, [{"role": "user", "content": "Rate it."}])
            plain = agent(client, role="writer")
            t2 = Task(id="t2", row={}, next_role="writer")
            plain.step = lambda t: plain.chat_json(t, [{"role": "user", "content": "Rate it."}])  # type: ignore[method-assign]
            await run_step(plain, t2, "writer", {"writer"})
        finally:
            await client.close()
            await runner.cleanup()
        return value, t, t2

    value, t, t2 = asyncio.run(main())
    assert value == {"verdict": "revise", "score": 4}
    assert [turn.error for turn in t.turns] == ["schema", None]
    assert bodies[0]["response_format"] == {"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT}}
    assert "response_format" not in bodies[2]
    assert t2.error is not None and (t2.error.kind, t2.error.role) == ("bad_reply", "writer")
    assert t2.error.message == "role 'writer', LLM call 1: reply has no JSON object: 'I would not grade it.'"


# --- config mistakes: one line, exit 2 --------------------------------------------


def _job(tmp: Path, sampling: dict[str, Any]) -> Path:
    cfg = {
        "workflow": {"name": "s", "entry": "critic", "roles": {"critic": {"agent": "tests.structured_agents:Critic", "sampling": sampling}}},
        "dataset": {"path": str(tmp / "rows.jsonl")},
        "llm": {"engine": "external", "base_urls": ["http://127.0.0.1:9/v1"]},
        "output": {"path": str(tmp / "out")},
    }
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


K = "matrix-hpc: config error: workflow.roles.critic.sampling"


@pytest.mark.parametrize(
    "sampling, expected",
    [
        (
            {"response_format": {"type": "objekt"}},
            f"{K}.response_format: not a valid JSON schema at $.type: 'objekt' is not valid under any of the given schemas",
        ),
        (
            {"response_format": {"type": "object", "required": "verdict"}},
            f"{K}.response_format: not a valid JSON schema at $.required: 'verdict' is not of type 'array'",
        ),
        ({"response_format": "xml"}, f"{K}.response_format: expected a JSON schema (a mapping) or 'json', got 'xml'"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "v", "schema": {}}}}, f"{K}.response_format: give the schema itself (or 'json')"),
        ({"extra": {"response_format": {"type": "json_object"}}}, f"{K}.extra.response_format: use workflow.roles.critic.sampling.response_format"),
    ],
)
def test_response_format_mistakes_are_one_line_and_exit_2(tmp_path: Path, sampling: dict[str, Any], expected: str) -> None:
    res = subprocess.run([str(BIN / "matrix-hpc"), "run", str(_job(tmp_path, sampling))], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith(expected), res.stderr


# --- a real run ---------------------------------------------------------------------


def test_run_with_a_schema_role_records_replies_that_match(tmp_path: Path, run_factory: Any) -> None:
    """``matrix-hpc run`` with the embedded engine: the config's schema reaches every call of the role."""
    data = write_jsonl(tmp_path / "rows.jsonl", [{"id": f"r{i}", "text": f"a short poem number {i}"} for i in range(6)])
    # Room for the object however much whitespace the grammar lets the model put in it (40
    # tokens once cut one at '{"verdict" : "accept"'), and a retry for a reply cut anyway.
    job = _job(tmp_path, {"response_format": VERDICT, "max_tokens": 160})
    cfg = yaml.safe_load(job.read_text())
    cfg["dataset"]["path"] = str(data)
    cfg["llm"] = {"engine": "embedded", "max_retries": 2, "embedded": {"n_parallel": 4, "ctx_per_slot": 512}}
    cfg["workflow"]["python_path"] = [str(REPO)]
    cfg["run"] = {"max_in_flight": 6, "progress": "log"}
    job.write_text(yaml.safe_dump(cfg))
    run = run_factory(job)
    assert run.wait(300) == 0, run.output
    records = store_records(tmp_path / "out")
    assert sorted(r["id"] for r in records) == [f"r{i}" for i in range(6)]
    for r in records:
        assert r["status"] == "ok", r
        jsonschema.validate(r["result"]["verdict"], VERDICT)
        *retried, turn = r["turns"]
        assert all(t["error"] == "schema" for t in retried), r["turns"]  # a reply that did not match is kept, marked
        assert json.loads(turn["text"]) == r["result"]["verdict"]
