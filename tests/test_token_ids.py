"""Token ids and logprobs (issue 24): ``sampling.logprobs`` / ``sampling.return_token_ids``.

The real embedded engine (llama.cpp: completion ids, chosen and top-N logprobs; no prompt ids),
a real run through ``matrix-hpc`` with its exports (JSONL lists, Parquet ``list<int32>`` /
``list<float32>``, the ``hf`` folder read back with ``datasets``), replay from the real journal,
and config mistakes (one line, exit 2). The vLLM side (prompt ids, exact continuation across
turns) is :func:`check_vllm_continuation`, run by tests/test_vllm_server.py on its started server.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from matrix_hpc.agents import Agent
from matrix_hpc.config import ModelConfig, SamplingConfig, resolve_sampling
from matrix_hpc.runtime.agent import AgentContext
from matrix_hpc.runtime.replay import Replay
from matrix_hpc.runtime.task import Task
from matrix_hpc.runtime.token_prefix import splice
from matrix_hpc.services.llm import ChatClient, EmbeddedEngine
from matrix_hpc.services.llm.embedded import free_port
from matrix_hpc.store.token_trace import TokenTrace

from .conftest import BIN, REPO, store_records, write_jsonl


def agent(llm: ChatClient, role: str = "talker", **sampling: Any) -> Agent:
    return Agent(AgentContext(role=role, llm=llm, sampling=resolve_sampling(ModelConfig(max_tokens=6, temperature=0.0), SamplingConfig(**sampling))))


async def dialogue(a: Agent, t: Task) -> None:
    """Two calls of one dialogue: the second holds the first reply as the assistant's message."""
    messages = [{"role": "user", "content": "Name a colour."}]
    first = await a.chat(t, messages)
    await a.chat(t, [*messages, {"role": "assistant", "content": first}, {"role": "user", "content": "Another?"}])


# --- what the request asks for, and how the ids line up (pure) ------------------------


def test_request_fields_ask_for_ids_and_logprobs_only_when_the_role_does() -> None:
    plain = resolve_sampling(None, SamplingConfig()).request_fields()
    assert not {"logprobs", "top_logprobs", "return_token_ids", "return_tokens_as_token_ids"} & set(plain)
    top = resolve_sampling(None, SamplingConfig(logprobs=3)).request_fields()
    assert (top["logprobs"], top["top_logprobs"], top["return_tokens_as_token_ids"], "return_token_ids" in top) == (True, 3, True, False)
    chosen = resolve_sampling(None, SamplingConfig(logprobs=0)).request_fields()
    assert chosen["logprobs"] is True and "top_logprobs" not in chosen
    ids = resolve_sampling(None, SamplingConfig(return_token_ids=True)).request_fields()
    assert ids["return_token_ids"] is True and ids["logprobs"] is True  # llama.cpp gives a completion's ids only in its logprobs


def test_splice_continues_the_sampled_ids_whatever_the_text_tokenizes_into() -> None:
    prompt, eot = [1, 10, 11], 2
    # The model spelt its reply 5, 6 and stopped (its own end-of-turn); the text tokenizes back as 56.
    open_reply = [1, 10, 11, 56]
    full = [*open_reply, eot, 198, 1, 20, 21]
    assert splice(prompt, [5, 6, eot], full, open_reply) == [1, 10, 11, 5, 6, eot, 198, 1, 20, 21]
    # Cut at max_tokens: no end-of-turn sampled, the template's is kept.
    assert splice(prompt, [5, 6], full, open_reply) == [1, 10, 11, 5, 6, eot, 198, 1, 20, 21]
    # New messages whose rendering does not hold the reply where it was are not spliced.
    assert splice(prompt, [5, 6], [1, 10, 12, 56, eot], open_reply) is None


def test_token_trace_is_compact_and_round_trips() -> None:
    trace = TokenTrace.of([1, 2, 3], [7, 8], [-0.25, -1.5], [[7, 4], [8, 9]], [[-0.25, -2.0], [-1.5, -3.0]])
    d = trace.to_dict()
    assert set(d) == {"prompt_ids", "ids", "logprobs", "top_n", "top_ids", "top_logprobs"} and d["top_n"] == 2
    assert len(d["ids"]) == 12  # base64 of 2 x 4 bytes, not a JSON number per token
    back = TokenTrace.from_dict(json.loads(json.dumps(d)))
    assert back == trace and pickle.loads(pickle.dumps(trace)) == trace
    assert back.array("top_ids").tolist() == [[7, 4], [8, 9]] and back.array("logprobs").dtype == np.float32
    with pytest.raises(ValueError, match="tokens.ids: not base64 text"):
        TokenTrace.from_dict({**d, "ids": "not base64!"})


# --- the embedded engine ---------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedEngine]:
    eng = EmbeddedEngine(n_parallel=2, ctx_per_slot=512, log_dir=tmp_path_factory.mktemp("engine"), port=free_port())
    eng.start()
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{eng.port}/health", timeout=2)
                break
            except OSError:
                asyncio.run(asyncio.sleep(0.1))
        yield eng
    finally:
        eng.stop()


def test_embedded_engine_gives_completion_ids_and_logprobs_not_prompt_ids(engine: EmbeddedEngine) -> None:
    async def main() -> tuple[Task, Task]:
        client = ChatClient([engine.base_url], "default")
        try:
            asked, plain = Task(id="a", row={}, next_role="talker"), Task(id="p", row={}, next_role="talker")
            await dialogue(agent(client, logprobs=2, return_token_ids=True), asked)
            await dialogue(agent(client), plain)
            return asked, plain
        finally:
            await client.close()

    asked, plain = asyncio.run(main())
    for turn in asked.turns:
        tr = turn.tokens
        assert tr is not None and tr.prompt_ids is None  # llama.cpp's chat API does not return the prompt's ids
        ids, lps, top_ids, top_lps = (tr.array(n) for n in ("ids", "logprobs", "top_ids", "top_logprobs"))
        assert len(ids) == len(lps) == turn.completion_tokens > 0 and top_ids.shape == top_lps.shape == (len(ids), 2)
        assert (lps <= 0).all() and (top_lps[:, 0] >= top_lps[:, 1]).all()
        assert (top_ids[:, 0] == ids).all() and np.allclose(top_lps[:, 0], lps)  # temperature 0: the likeliest token is the one chosen
        rec = turn.as_dict()["tokens"]
        assert isinstance(rec["ids"], str) and TokenTrace.from_dict(rec) == tr
    assert all(t.tokens is None for t in plain.turns) and plain.to_record()["turns"][0]["tokens"] is None
    back = pickle.loads(pickle.dumps(asked))  # what every hop does
    assert [t.tokens for t in back.turns] == [t.tokens for t in asked.turns]


def test_replay_gives_back_the_same_ids_and_logprobs(engine: EmbeddedEngine, tmp_path: Path) -> None:
    from matrix_hpc.store.call_journal import CallJournal

    def life(name: str) -> Task:
        async def main() -> Task:
            client = ChatClient([engine.base_url], "default")
            segment = CallJournal(tmp_path / "journal", "r").open_segment(name, 0, "0")
            try:
                a = agent(client, logprobs=1, return_token_ids=True)
                a.ctx.replay = Replay(segment)
                t = Task(id="q1", row={}, next_role="talker")
                await dialogue(a, t)
                return t
            finally:
                await segment.close()
                await client.close()

        return asyncio.run(main())

    first, second = life("life1"), life("life2")
    assert [t.replayed for t in first.turns] == [False, False] and [t.replayed for t in second.turns] == [True, True]
    assert [t.text for t in second.turns] == [t.text for t in first.turns]
    assert all(t.tokens is not None and t.tokens.ids for t in first.turns)
    assert [t.tokens for t in second.turns] == [t.tokens for t in first.turns]


# --- config mistakes: one line, exit 2 --------------------------------------------------


def _job(tmp: Path, sampling: dict[str, Any], engine: str = "external") -> Path:
    cfg: dict[str, Any] = {
        "workflow": {
            "name": "tokens", "entry": "talker", "python_path": [str(REPO)],
            "roles": {"talker": {"agent": "tests.token_agents:Talker", "sampling": sampling}, "plain": {"agent": "tests.token_agents:Plain"}},
        },
        "dataset": {"path": str(write_jsonl(tmp / "rows.jsonl", [{"id": f"r{i}", "text": f"a poem number {i}"} for i in range(4)]))},
        "llm": {"engine": "external", "base_urls": ["http://127.0.0.1:9/v1"]},
        "output": {"path": str(tmp / "out"), "flush_interval_s": 0.2},
        "run": {"max_in_flight": 4, "progress": "log"},
    }  # fmt: skip
    if engine == "embedded":
        cfg["llm"] = {"engine": "embedded", "max_tokens": 8, "temperature": 0.0, "embedded": {"n_parallel": 4, "ctx_per_slot": 512}}
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


K = "matrix-hpc: config error: workflow.roles.talker.sampling"


@pytest.mark.parametrize(
    "sampling, expected",
    [
        ({"logprobs": -1}, f"{K}.logprobs: expected an int from 0 (the chosen tokens only) to 20, got -1"),
        ({"logprobs": 21}, f"{K}.logprobs: expected an int from 0 (the chosen tokens only) to 20, got 21"),
        ({"logprobs": "five"}, f"{K}.logprobs: expected int, got 'five'"),
        ({"logprobs": True}, f"{K}.logprobs: expected int, got True"),  # OpenAI's flag: here the number of top tokens
        ({"return_token_ids": "yes"}, f"{K}.return_token_ids: expected bool, got 'yes'"),
        ({"extra": {"top_logprobs": 5}}, f"{K}.extra.top_logprobs: set by the runtime: use workflow.roles.talker.sampling.logprobs"),
        ({"return_token_id": True}, "matrix-hpc: config error: unknown key workflow.roles.talker.sampling.return_token_id (expected one of: "),
    ],
)
def test_token_sampling_mistakes_are_one_line_and_exit_2(tmp_path: Path, sampling: dict[str, Any], expected: str) -> None:
    res = subprocess.run([str(BIN / "matrix-hpc"), "run", str(_job(tmp_path, sampling))], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith(expected), res.stderr


# --- a real run and its exports -----------------------------------------------------------


def test_run_keeps_ids_and_logprobs_and_every_export_has_them(tmp_path: Path, run_factory: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    job = _job(tmp_path, {"logprobs": 2, "return_token_ids": True}, engine="embedded")
    run = run_factory(job)
    assert run.wait(300) == 0, run.output
    out = tmp_path / "out"
    records = store_records(out)
    assert sorted(r["id"] for r in records) == [f"r{i}" for i in range(4)]
    expected: dict[str, list[Any]] = {}
    for r in records:
        assert r["status"] == "ok", r
        talker, plain = [t for t in r["turns"] if t["role"] == "talker"], [t for t in r["turns"] if t["role"] == "plain"]
        assert len(talker) == 2 and len(plain) == 1 and plain[0]["tokens"] is None  # the role that did not ask
        traces = [TokenTrace.from_dict(t["tokens"]) for t in talker]
        for t, tr in zip(talker, traces):
            assert len(tr.array("ids")) == len(tr.array("logprobs")) == t["completion_tokens"] and tr.top_n == 2
        expected[r["id"]] = [
            {n: (None if tr.array(n) is None else tr.array(n).tolist()) for n in ("ids", "logprobs", "top_ids", "top_logprobs")} for tr in traces
        ]

    def check(rows: list[dict[str, Any]]) -> None:
        assert len(rows) == 4
        for r in rows:
            got = [t["tokens"] for t in r["turns"] if t["role"] == "talker"]
            assert [{n: g[n] for n in ("ids", "logprobs", "top_ids", "top_logprobs")} for g in got] == expected[r["id"]]
            assert all(g["prompt_ids"] is None for g in got)

    for fmt in ("jsonl", "parquet", "hf"):
        to = tmp_path / f"export.{fmt}"
        res = subprocess.run(
            [str(BIN / "matrix-hpc"), "export", str(out), "--format", fmt, "--to", str(to)], capture_output=True, text=True, timeout=120, cwd=REPO
        )
        assert res.returncode == 0, res.stderr
    check([json.loads(line) for line in (tmp_path / "export.jsonl").read_text().splitlines()])
    table = pq.read_table(tmp_path / "export.parquet")
    tokens = table.schema.field("turns").type.value_type.field("tokens").type
    assert tokens.field("ids").type == pa.list_(pa.int32()) and tokens.field("logprobs").type == pa.list_(pa.float32())
    assert tokens.field("top_ids").type == pa.list_(pa.list_(pa.int32())) and tokens.field("prompt_ids").type == pa.list_(pa.int32())
    check(table.to_pylist())  # float32 read back: the same Python floats the store's float32 decode to

    import datasets

    check(list(datasets.load_dataset("parquet", data_dir=str(tmp_path / "export.hf"), split="train")))
    roles = yaml.safe_load((tmp_path / "export.hf" / "README.md").read_text().split("---\n")[1])["matrix_hpc"]["roles"]
    assert roles["talker"]["sampling"] == {"max_tokens": 8, "temperature": 0.0, "logprobs": 2, "return_token_ids": True}
    assert roles["plain"]["sampling"] == {"max_tokens": 8, "temperature": 0.0}  # the card names only what a role asks


# --- vLLM: run by tests/test_vllm_server.py on the server it has started ---------------------


def _post(url: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def check_vllm_continuation(base_url: str) -> None:
    """On vLLM each turn keeps its prompt ids, and a dialogue's next turn begins with the previous
    turn's prompt and completion ids, even where the reply's text tokenizes into other ids: the
    first reply may use only the token ``e``, so it is spelt ``e``, ``e`` while its text ``ee`` is
    one token of its own (the drift the chat API alone would put in the next prompt)."""
    root = base_url.removesuffix("/v1")
    e = _post(f"{root}/tokenize", {"model": "default", "prompt": "e", "add_special_tokens": False})["tokens"]
    ee = _post(f"{root}/tokenize", {"model": "default", "prompt": "ee", "add_special_tokens": False})["tokens"]
    assert len(e) == 1 and ee != e * 2, (e, ee)  # the tokenizer's own spelling of "ee" is not e, e

    async def main() -> tuple[Task, list[dict[str, str]], list[dict[str, str]]]:
        client = ChatClient([base_url], "default")
        try:
            a = agent(client, logprobs=1, return_token_ids=True)
            t = Task(id="v", row={}, next_role="talker")
            messages = [{"role": "user", "content": "Write the letter e twice."}]
            first = await a.chat(t, messages, allowed_token_ids=e, max_tokens=2)
            messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "Now name a colour."}]
            second = await a.chat(t, messages, max_tokens=12)
            messages += [{"role": "assistant", "content": second}, {"role": "user", "content": "Another one?"}]
            third = await a.chat(t, messages, max_tokens=6)
            # The same dialogue with its first message edited: not the history the ids were sampled after.
            edited = [
                {"role": "user", "content": "Write e twice."},
                *messages[1:],
                {"role": "assistant", "content": third},
                {"role": "user", "content": "Last?"},
            ]
            await a.chat(t, edited, max_tokens=2)
            return t, messages, edited
        finally:
            await client.close()

    t, messages, edited = asyncio.run(main())
    assert t.turns[0].text == "ee" and t.turns[0].tokens.array("ids").tolist() == e * 2
    rendered = _post(f"{root}/tokenize", {"model": "default", "messages": messages[:3], "add_generation_prompt": True})["tokens"]
    assert (
        t.turns[3].tokens.array("prompt_ids").tolist()
        == _post(f"{root}/tokenize", {"model": "default", "messages": edited, "add_generation_prompt": True})["tokens"]
    )
    for k, turn in enumerate(t.turns[:3]):
        tr = turn.tokens
        prompt, ids, lps = tr.array("prompt_ids").tolist(), tr.array("ids").tolist(), tr.array("logprobs")
        assert len(prompt) == turn.prompt_tokens and len(ids) == len(lps) == turn.completion_tokens and tr.top_n == 1
        if k:
            before = t.turns[k - 1].tokens
            head = before.array("prompt_ids").tolist() + before.array("ids").tolist()
            assert prompt[: len(head)] == head, f"turn {k}'s prompt ids do not begin with turn {k - 1}'s prompt and completion"
        if k == 1:
            assert rendered[: len(head)] != head  # what the messages alone would have sent: the drift mended
