"""The one token-usage type (store/tokens.py) and the formats built on it, which must not change:
a record's ``usage``, run.json's ``usage`` and ``replay`` (a file of the previous format loads),
the view's per-role table and the Hugging Face card's token counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from matrix_hpc.runinfo import RunInfo
from matrix_hpc.runtime.task import Task, Turn
from matrix_hpc.runtime.usage import ReplaySummary, UsageSummary, replay_summary, usage_summary
from matrix_hpc.store.hf_export import _Stats
from matrix_hpc.store.tokens import TokenUsage
from matrix_hpc.view.facets import Aggregates

PREVIOUS_RUN_JSON = Path(__file__).parent / "data" / "run-before-token-usage.json"
"""run.json as a real run (tests/test_replay_e2e.py's resume) wrote it before TokenUsage existed."""


def test_addition_is_field_by_field_and_the_value_is_immutable() -> None:
    a = TokenUsage.of_call(100, 20, 0.5, failed=False)
    b = TokenUsage.of_call(7, 0, 2.0, failed=True)
    assert a + b == TokenUsage(prompt_tokens=107, completion_tokens=20, calls=2, errors=1, latency_s=2.5)
    assert type(a + b) is TokenUsage and sum([a, b, a], TokenUsage()) == a + b + a
    assert (a + b).total == 127 and (a + b).mean_latency_s == 1.25 and TokenUsage().mean_latency_s == 0.0
    assert a + TokenUsage() == a
    with pytest.raises(TypeError):
        a + (1, 2, 3, 4, 5.0)  # not tuple concatenation, and not a silent sum with a plain tuple
    with pytest.raises(AttributeError):
        a.calls = 5  # type: ignore[misc]


def test_dict_round_trip_and_dicts_of_other_versions() -> None:
    u = TokenUsage(prompt_tokens=3, completion_tokens=4, calls=2, errors=1, latency_s=0.25)
    assert u.to_dict() == {"prompt_tokens": 3, "completion_tokens": 4, "calls": 2, "errors": 1, "latency_s": 0.25}
    assert TokenUsage.from_dict(u.to_dict()) == u and TokenUsage.from_dict(json.loads(json.dumps(u.to_dict()))) == u
    assert u.token_counts() == {"prompt_tokens": 3, "completion_tokens": 4}
    # Older dicts lack keys, newer ones have more (run.json's mean_latency_s), JSON may hold nulls.
    old = TokenUsage.from_dict({"prompt_tokens": 5, "calls": 1, "mean_latency_s": 9.0, "cached_tokens": 2, "latency_s": None})
    assert old == TokenUsage(prompt_tokens=5, calls=1) and type(old.latency_s) is float and type(old.errors) is int
    assert TokenUsage.from_dict(None) == TokenUsage()
    # A turn as a record stores it is one call.
    turn = {"role": "a", "prompt_tokens": 10, "completion_tokens": None, "latency_s": 0.5, "error": "llm_timeout", "model": "m"}
    assert TokenUsage.of_turn(turn) == TokenUsage(prompt_tokens=10, completion_tokens=0, calls=1, errors=1, latency_s=0.5)


def test_a_records_usage_is_written_as_before() -> None:
    t = Task("t1", {"q": 1}, "a")
    t.turns += [
        Turn(role="a", text="x", prompt_tokens=10, completion_tokens=3, latency_s=0.5, endpoint="http://e/v1", model="m1"),
        Turn(role="tool", text="ran"),  # a step that called no LLM: not a call
        Turn(role="b", text="", prompt_tokens=4, latency_s=2.0, model="m2", error="llm_timeout"),  # a failed call
        Turn(role="a", text="y", prompt_tokens=20, completion_tokens=5, latency_s=1.0, endpoint="http://e/v1", model="m1", replayed=True),
    ]
    usage = t.to_record(finished_at=1.0)["usage"]
    expected = {
        "prompt_tokens": 34,
        "completion_tokens": 8,
        "by_role": {
            "a": {"prompt_tokens": 30, "completion_tokens": 8, "calls": 2, "errors": 0, "latency_s": 1.5},
            "b": {"prompt_tokens": 4, "completion_tokens": 0, "calls": 1, "errors": 1, "latency_s": 2.0},
        },
        "by_model": {
            "m1": {"prompt_tokens": 30, "completion_tokens": 8, "calls": 2, "errors": 0, "latency_s": 1.5},
            "m2": {"prompt_tokens": 4, "completion_tokens": 0, "calls": 1, "errors": 1, "latency_s": 2.0},
        },
    }
    assert json.dumps(usage) == json.dumps(expected)  # keys in the same order too
    assert t.usage == TokenUsage(prompt_tokens=34, completion_tokens=8, calls=4, errors=1, latency_s=3.5)  # every turn, steps included

    # What run.json and the replay summary make of such records.
    rec = t.to_record(finished_at=10.0)
    summary = usage_summary([rec, rec])
    assert summary.by_role["a"] == TokenUsage(prompt_tokens=60, completion_tokens=16, calls=4, errors=0, latency_s=3.0)
    assert summary.to_dict()["by_model"]["m2"] == {"prompt_tokens": 8, "completion_tokens": 0, "calls": 2, "errors": 2, "latency_s": 4.0, "mean_latency_s": 2.0}
    assert (summary + summary).by_model["m1"].calls == 8 and (summary + UsageSummary()).to_dict() == summary.to_dict()
    replay = replay_summary([rec, {**rec, "finished_at": 1.0}], since=5.0)  # the second finished before this life
    assert replay.to_dict() == {"calls": 1, "prompt_tokens": 20, "completion_tokens": 5, "saved_s": 1.0} and replay.tokens == 25


def test_run_json_of_the_previous_format_loads_and_writes_back_the_same() -> None:
    data = json.loads(PREVIOUS_RUN_JSON.read_text())
    info = RunInfo.from_dict(data)
    teacher = info.usage.by_role["teacher"]
    assert teacher == TokenUsage(prompt_tokens=3779, completion_tokens=426, calls=32, errors=0, latency_s=401.95254443799786)
    assert info.usage.by_model["default"].calls == 64 and round(info.usage.by_model["default"].mean_latency_s, 4) == 11.3348
    assert info.replay is not None and (info.replay.calls, info.replay.tokens, info.replay.saved_s) == (4, 524, 25.256)
    again = info.to_dict()
    assert again["usage"] == data["usage"] and again["replay"] == data["replay"]
    assert ReplaySummary.from_dict({"calls": 2}).to_dict() == {"calls": 2, "prompt_tokens": 0, "completion_tokens": 0, "saved_s": 0.0}


def test_the_views_and_the_cards_token_tables_keep_their_keys() -> None:
    turns = [
        {"role": "a", "model": "m1", "prompt_tokens": 10, "completion_tokens": 3, "latency_s": 0.5, "error": None},
        {"role": "a", "model": "m1", "prompt_tokens": 20, "completion_tokens": 9, "latency_s": 7.0, "error": None, "replayed": True},
        {"role": "b", "model": "m2", "prompt_tokens": 4, "completion_tokens": 0, "latency_s": 1.5, "error": "llm_timeout"},
    ]
    agg = Aggregates()
    assert agg.add({"turns": turns}) == (3, 2.0, 1)
    out = agg.to_dict()
    # Replayed calls are counted, their latency is not this run's.
    assert out["by_role"]["a"] == {"prompt_tokens": 30, "completion_tokens": 12, "calls": 2, "errors": 0, "replayed": 1, "mean_latency_s": 0.5}
    assert out["by_model"]["m2"] == {"prompt_tokens": 4, "completion_tokens": 0, "calls": 1, "errors": 1, "replayed": 0, "mean_latency_s": 1.5}
    only_replayed = Aggregates()
    only_replayed.add({"turns": turns[1:2]})
    assert only_replayed.to_dict()["by_role"]["a"]["mean_latency_s"] is None and only_replayed.by_role["a"].calls == 1

    stats = _Stats()
    stats.add({"status": "ok", "turns": turns})
    assert stats.tokens[("a", "m1")] == TokenUsage(prompt_tokens=30, completion_tokens=12, calls=2, latency_s=7.5)
    assert stats.max_completion[("a", "m1")] == 9
