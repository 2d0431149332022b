"""The web-reasoning workflow: its decisions without an LLM, then one real run end to end.

The unit tests call the parsing functions and the agents' reply handlers directly
(``AgentContext`` with ``llm=None``); the end-to-end test runs ``matrix-hpc run`` on
the real embedded engine and checks the mechanics (one record per id, every
record accepted, rejected with a reason, or failed with a clear kind), not the
quality of a 135M-parameter model's questions.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from matrix_hpc.agents import Agent, AgentContext, Task
from matrix_hpc.config import Sampling, load_config, resolve_dataset_path
from matrix_hpc.runtime.actor import load_object
from workflows.web_reasoning.agents import (
    EXAMPLE_JUNK,
    EXAMPLE_QA,
    EXAMPLE_SCORES,
    BadOutput,
    Filter,
    Questioner,
    RuleLimits,
    Scorer,
    extract_json_object,
    metrics,
    parse_qa,
    parse_scores,
    parse_yes_no,
    rule_check,
)

from .conftest import REPO, store_records, write_jsonl

WORKFLOW = REPO / "workflows" / "web_reasoning"
DOCS = [json.loads(line) for line in (WORKFLOW / "data" / "documents.jsonl").read_text().splitlines() if line.strip()]
CRITERIA = ["reasoning_depth", "factual_density", "clarity"]
# Bundled documents written to fail the cheap rules (the rest are for the LLM to judge).
RULE_REJECTS = {
    "d003": "boilerplate", "d006": "too short", "d012": "too short", "d015": "repetitive",
    "d021": "mostly non-alphabetic", "d024": "too short", "d027": "too long", "d030": "too short",
    "d036": "too short", "d039": "too short", "d042": "too short", "d045": "too short",
    "d048": "too short", "d054": "too short", "d057": "too short", "d060": "too short",
}  # fmt: skip
ARTICLE = next(d for d in DOCS if d["id"] == "d001")


def ctx(role: str, params: dict[str, Any] | None = None) -> AgentContext:
    return AgentContext(role, params or {}, None, Sampling(32, 0.0))


def task_for(row: dict[str, Any], role: str = "filter") -> Task:
    return Task(id=row["id"], row=row, next_role=role)


# --- the cheap rules -------------------------------------------------------------


def test_rule_check_reasons() -> None:
    limits = RuleLimits()
    prose = "Water expands when it freezes, so ice floats on lakes. " * 2 + ARTICLE["text"]
    assert rule_check(ARTICLE["text"], limits) is None
    assert rule_check("x" * 2401, limits) == "too long: 2401 chars > max_chars 2400"
    assert rule_check("Only a few words here.", limits) == "too short: 5 words < min_words 60"
    table = " | ".join(f"row {i} 12345.67 89012" for i in range(70))
    assert (rule_check(table, limits) or "").startswith("mostly non-alphabetic:")
    no_stops = " ".join(f"word{i} alpha beta gamma" for i in range(20))
    assert rule_check(no_stops, limits) == "too few sentences: 0 < min_sentences 3"
    spam = "Buy cheap shoes now. Cheap shoes sale. Best cheap shoes. " * 8
    assert (rule_check(spam, limits) or "").startswith("repetitive:")
    banner = prose + " We use cookies. Read our privacy policy."
    assert rule_check(banner, limits) == "boilerplate: 'we use cookies', 'privacy policy'"
    assert rule_check(prose + " Please sign in to comment.", limits) is None  # one phrase is not enough


def test_rule_limits_from_params_casts_and_rejects_unknown_keys() -> None:
    limits = RuleLimits.from_params({"min_words": "10", "min_alpha_ratio": 1, "boilerplate": ["Accept ALL"]})
    assert (limits.min_words, limits.min_alpha_ratio, limits.boilerplate) == (10, 1.0, ("accept all",))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['min_wrds'\]"):
        RuleLimits.from_params({"min_wrds": 10})


def test_bundled_dataset_and_rule_decisions() -> None:
    assert [d["id"] for d in DOCS] == [f"d{i:03d}" for i in range(1, 61)]
    assert all(set(d) == {"id", "url", "title", "text"} and d["url"].startswith("https://example.") for d in DOCS)
    limits = RuleLimits()
    decisions = {d["id"]: rule_check(d["text"], limits) for d in DOCS}
    rejected = {i: reason for i, reason in decisions.items() if reason}
    assert set(rejected) == set(RULE_REJECTS)
    assert all(rejected[i].startswith(prefix) for i, prefix in RULE_REJECTS.items()), rejected
    articles = [d for d in DOCS if "/explainers/" in d["url"]]
    assert len(articles) == 40 and all(80 <= len(d["text"].split()) <= 250 for d in articles)


def test_config_loads_and_roles_import() -> None:
    cfg = load_config(WORKFLOW / "config.yaml")
    assert cfg.workflow.entry == "filter" and resolve_dataset_path(cfg).exists()
    assert cfg.dataset.required_fields == ["text"] and cfg.dataset.limit
    for role in cfg.workflow.roles.values():
        assert issubclass(load_object(role.agent), Agent)
    assert cfg.workflow.metrics and load_object(cfg.workflow.metrics) is metrics
    assert RuleLimits.from_params(cfg.workflow.roles["filter"].params["rules"]) == RuleLimits()


# --- parsing LLM replies -----------------------------------------------------------


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("Yes", True),
        ("yes.", True),
        ("**Yes**, it explains a mechanism.", True),
        ("No, although it mentions cookies.", False),
        ("NO", False),
        ("Answer: yes", True),
        ("I would say no.", False),
        ("Yes and no.", True),  # a leading answer wins
        ("The text is about yes or no questions", None),
        ("Not really sure", None),  # "not" is not "no"
        ("", None),
    ],
)
def test_parse_yes_no(reply: str, expected: bool | None) -> None:
    assert parse_yes_no(reply) is expected


@pytest.mark.parametrize(
    "reply",
    [
        '{"a": 1}',
        'Here are the scores:\n```json\n{"a": 1}\n```\nHope this helps.',
        '```\n{"a": 1}\n```',
        'Sure! {"a": 1} is my rating.',
        'Rating {not json} then {"a": 1}',
        '```json\n{"a": 1}',  # an unclosed fence, as when max_tokens cuts the reply
    ],
)
def test_extract_json_object_finds_the_object(reply: str) -> None:
    assert extract_json_object(reply) == {"a": 1}


@pytest.mark.parametrize("reply", ["no json here", '{"a": 1', "[1, 2, 3]", "{'a': 1}", ""])
def test_extract_json_object_rejects_malformed(reply: str) -> None:
    with pytest.raises(BadOutput, match="no JSON object"):
        extract_json_object(reply)


def test_parse_scores() -> None:
    assert parse_scores('```json\n{"Reasoning Depth": 4, "factual_density": 3.5, "clarity": 5}\n```', CRITERIA) == {
        "reasoning_depth": 4, "factual_density": 3.5, "clarity": 5,
    }  # fmt: skip
    for reply, message in [
        ('{"reasoning_depth": 4, "factual_density": 3}', "score 'clarity' missing"),
        ('{"reasoning_depth": 4, "factual_density": 3, "clarity": 7}', "score 'clarity'=7 outside 1-5"),
        ('{"reasoning_depth": 0, "factual_density": 3, "clarity": 4}', "score 'reasoning_depth'=0 outside 1-5"),
        ('{"reasoning_depth": "high", "factual_density": 3, "clarity": 4}', "score 'reasoning_depth' is not a number: 'high'"),
        ('{"reasoning_depth": true, "factual_density": 3, "clarity": 4}', "score 'reasoning_depth' is not a number: True"),
    ]:
        with pytest.raises(BadOutput) as err:
            parse_scores(reply, CRITERIA)
        assert str(err.value) == message


def test_parse_qa() -> None:
    assert parse_qa('Q: {"question": " Why? ", "answer": "Because."}') == ("Why?", "Because.")
    with pytest.raises(BadOutput, match="'question' missing"):
        parse_qa('{"question": "  ", "answer": "x"}')
    with pytest.raises(BadOutput, match="'answer' missing"):
        parse_qa('{"question": "Why?"}')


def test_prompts_ask_for_what_the_parsers_accept() -> None:
    scorer = Scorer(ctx("scorer", {"criteria": {"depth": "how deep?", "novelty": "how new?"}}))
    prompt = scorer.prompt("DOC")
    assert "- novelty: how new?" in prompt and 'the keys "depth", "novelty"' in prompt and prompt.endswith("DOC")
    assert Questioner.prompt("DOC").startswith("DOC") and '{"question": "...", "answer": "..."}' in Questioner.prompt("DOC")
    # The worked examples shown to the model pass the parsers themselves.
    assert parse_scores(json.dumps(dict(zip(CRITERIA, EXAMPLE_SCORES))), CRITERIA)
    assert parse_qa(json.dumps(EXAMPLE_QA))[0].startswith("Why")
    assert rule_check(EXAMPLE_JUNK, RuleLimits()) and parse_yes_no("No") is False and parse_yes_no("Yes") is True


# --- the agents' decisions (no LLM) --------------------------------------------------


def test_filter_rule_rejection_ends_early_without_llm_call() -> None:
    row = next(d for d in DOCS if d["id"] == "d003")
    task = task_for(row)
    asyncio.run(Filter(ctx("filter")).step(task))
    assert task.done and task.error is None and task.turns == []
    res = task.result
    assert res is not None and res["accepted"] is False and (res["rejected_by"], res["stage"]) == ("filter", "rule")
    assert res["reason"].startswith("boilerplate:") and (res["doc_id"], res["title"]) == ("d003", "Cookie notice")


def test_filter_sends_a_passing_document_to_the_llm() -> None:
    with pytest.raises(RuntimeError, match="no LLM client"):
        asyncio.run(Filter(ctx("filter")).step(task_for(ARTICLE)))


def test_filter_fails_a_non_string_text_as_bad_input() -> None:
    task = task_for({"id": "x", "text": ["a", "list"]})
    asyncio.run(Filter(ctx("filter")).step(task))
    assert task.error is not None and task.error.kind == "bad_input" and task.error.role == "filter"
    assert task.error.message == "row x: field 'text' must be a string, got list"


def test_filter_answers() -> None:
    agent = Filter(ctx("filter", {"next": "scorer"}))
    yes, no, odd = task_for(ARTICLE), task_for(ARTICLE), task_for(ARTICLE)
    agent.on_answer(yes, "Yes.")
    assert yes.next_role == "scorer" and yes.result is None
    agent.on_answer(no, "No, it is an advert.")
    assert no.done and no.result and no.result["stage"] == "llm_filter" and no.result["reason"] == "the model answered no"
    agent.on_answer(odd, "The document describes the sky.")
    assert odd.done and odd.result and odd.result["accepted"] is False and odd.error is None
    assert odd.result["reason"] == "unparseable answer 'The document describes the sky.', counted as no"


def test_scorer_threshold_and_bad_output() -> None:
    agent = Scorer(ctx("scorer", {"min_mean_score": 3.0, "next": "questioner"}))
    low, high, bad, out_of_range = (task_for(ARTICLE, "scorer") for _ in range(4))
    agent.on_reply(low, '{"reasoning_depth": 2, "factual_density": 3, "clarity": 3}')
    assert low.done and low.result is not None and low.result["stage"] == "score" and low.result["rejected_by"] == "scorer"
    assert low.result["reason"] == "mean score 2.67 < min_mean_score 3.0" and low.result["mean_score"] == 2.67
    agent.on_reply(high, 'My rating:\n```json\n{"reasoning_depth": 4, "factual_density": 3, "clarity": 5}\n```')
    assert high.next_role == "questioner" and high.state["scores"]["clarity"] == 5 and high.state["mean_score"] == 4.0
    agent.on_reply(bad, "I think this document is great, 5 out of 5!")
    assert bad.error is not None and (bad.error.kind, bad.error.role) == ("bad_llm_output", "scorer")
    assert bad.error.message == "scorer: no JSON object in the reply; reply: 'I think this document is great, 5 out of 5!'"
    agent.on_reply(out_of_range, '{"reasoning_depth": 9, "factual_density": 3, "clarity": 3}' + " padding" * 40)
    assert out_of_range.error is not None and "score 'reasoning_depth'=9 outside 1-5" in out_of_range.error.message
    assert out_of_range.error.message.endswith("…'") and len(out_of_range.error.message) < 220  # a short excerpt


def test_questioner_accepts_or_fails() -> None:
    agent = Questioner(ctx("questioner"))
    good, bad = task_for(ARTICLE, "questioner"), task_for(ARTICLE, "questioner")
    for t in (good, bad):
        t.state.update(scores={"reasoning_depth": 4, "factual_density": 4, "clarity": 4}, mean_score=4.0)
    agent.on_reply(good, '```json\n{"question": "Why is the sunset red?", "answer": "Blue light is scattered away."}\n```')
    assert good.done and good.error is None and good.result is not None
    assert {k: good.result[k] for k in ("accepted", "doc_id", "title", "mean_score", "question")} == {
        "accepted": True, "doc_id": "d001", "title": "Why the sky is blue", "mean_score": 4.0, "question": "Why is the sunset red?",
    }  # fmt: skip
    agent.on_reply(bad, '{"question": "Why?", "answer": ')
    assert bad.error is not None and bad.error.kind == "bad_llm_output" and bad.error.message.startswith("questioner: no JSON object")


def test_metrics() -> None:
    usage = {"prompt_tokens": 10, "completion_tokens": 2}
    recs: list[dict[str, Any]] = [
        {"status": "ok", "usage": usage, "result": {"accepted": True, "scores": {"clarity": 4, "reasoning_depth": 5}}},
        {"status": "ok", "usage": usage, "result": {"accepted": False, "stage": "score", "scores": {"clarity": 2, "reasoning_depth": 2}}},
        {"status": "ok", "usage": usage, "result": {"accepted": False, "stage": "llm_filter", "scores": None}},
        {"status": "ok", "usage": {"prompt_tokens": 0, "completion_tokens": 0}, "result": {"accepted": False, "stage": "rule", "scores": None}},
        {"status": "failed", "usage": usage, "result": None, "error": {"kind": "bad_llm_output"}},
        {"status": "failed", "usage": {"prompt_tokens": 0, "completion_tokens": 0}, "result": None, "error": {"kind": "bad_input"}},
    ]
    assert metrics(recs) == {
        "documents": 6, "accepted": 1, "rejected": {"llm_filter": 1, "rule": 1, "score": 1},
        "failed": {"bad_input": 1, "bad_llm_output": 1}, "mean_scores": {"clarity": 3.0, "reasoning_depth": 3.5},
        "prompt_tokens": 40, "completion_tokens": 8,
    }  # fmt: skip
    assert metrics([])["documents"] == 0 and metrics([])["mean_scores"] == {}


# --- end to end ----------------------------------------------------------------------

ROLE_PATH = {"rule": [], "llm_filter": ["filter"], "score": ["filter", "scorer"]}


@pytest.mark.slow
def test_run_end_to_end(tmp_path: Path, run_factory: Any) -> None:
    docs = DOCS[:9]  # seven articles and two rule rejects (d003, d006)
    bad_rows: list[dict[str, Any]] = [{"id": "bad-text", "url": "https://example.org/x", "title": "x", "text": 42}, {"id": "no-text", "title": "y"}]
    data = write_jsonl(tmp_path / "docs.jsonl", [*docs, *bad_rows])
    cfg = yaml.safe_load((WORKFLOW / "config.yaml").read_text())
    cfg["dataset"].update(path=str(data), limit=None)
    cfg["output"].update(path=str(tmp_path / "out"), flush_interval_s=0.2)
    cfg["llm"]["embedded"]["n_parallel"] = 8
    cfg["run"].update(progress="log", progress_interval_s=1.0)
    for role, max_tokens in {"filter": 4, "scorer": 40, "questioner": 64}.items():
        cfg["workflow"]["roles"][role]["sampling"] = {"max_tokens": max_tokens}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))

    run = run_factory(tmp_path / "job.yaml")
    assert run.wait(300) == 0, run.output[-3000:]
    records = store_records(tmp_path / "out")
    counts = Counter(r["id"] for r in records)
    assert sorted(counts) == sorted([d["id"] for d in docs] + ["bad-text", "no-text"]) and max(counts.values()) == 1

    for rec in records:
        roles = [t["role"] for t in rec["turns"]]
        if rec["status"] == "failed":
            err = rec["error"]
            if rec["id"] in ("bad-text", "no-text"):
                assert err["kind"] == "bad_input" and rec["id"] in err["message"], err
            else:
                assert err["kind"] == "bad_llm_output" and err["role"] in ("scorer", "questioner"), err
                assert err["message"].startswith(f"{err['role']}: ") and "; reply: " in err["message"]
                assert roles[-1] == err["role"]
            continue
        res = rec["result"]
        assert res["doc_id"] == rec["id"]
        if res["accepted"]:
            assert roles == ["filter", "scorer", "questioner"] and set(res["scores"]) == set(CRITERIA)
            assert isinstance(res["question"], str) and res["question"] and isinstance(res["answer"], str) and res["answer"]
        else:
            assert res["rejected_by"] in ("filter", "scorer") and isinstance(res["reason"], str) and res["reason"]
            assert roles == ROLE_PATH[res["stage"]], (rec["id"], res)
        if res.get("stage") == "rule":
            assert rec["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "by_role": {}, "by_model": {}}
        else:
            assert all(t["completion_tokens"] > 0 for t in rec["turns"]) and rec["usage"]["prompt_tokens"] > 0

    rule_rejected = {r["id"] for r in records if r["status"] == "ok" and r["result"].get("stage") == "rule"}
    assert rule_rejected == {"d003", "d006"}
    summary = json.loads((tmp_path / "out" / "run.json").read_text())["metrics"]
    assert summary["documents"] == 11 and summary["rejected"]["rule"] == 2 and summary["failed"]["bad_input"] == 2
    assert summary["accepted"] + sum(summary["rejected"].values()) + sum(summary["failed"].values()) == 11
    assert "documents=11" in run.output
