"""The collaborative-reasoning workflow's non-LLM logic: answer extraction and the judge."""

from __future__ import annotations

import asyncio

import pytest

from matrix_hpc.agents import AgentContext, Task, Turn
from workflows.collab_reasoning.agents import Judge, Speaker, extract_answer, metrics

ROW = {"id": "q1", "question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": "B"}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("I think... The answer is (B).", "B"),
        ("the answer is (c)", "C"),
        ("Answer: (D)", "D"),
        ("Maybe (A)? No. The answer is (B). Later: the answer is (C)", "C"),
        ("It is (B) I guess", "B"),
        ("The answer is (E)", None),  # only 4 choices
        ("no idea", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text, 4) == expected


def judge(max_turns: int = 4) -> Judge:
    return Judge(AgentContext("judge", {"speakers": ["teacher", "student"], "max_turns": max_turns}))


def step(agent: Judge, task: Task) -> None:
    asyncio.run(agent.step(task))


def test_judge_routes_until_agreement() -> None:
    j = judge()
    task = Task(id="q1", row=ROW, next_role="judge", turns=[Turn("teacher", "The answer is (B)")])
    step(j, task)
    assert task.next_role == "student" and task.result is None
    task.turns.append(Turn("student", "The answer is (C)"))
    step(j, task)
    assert task.next_role == "teacher"
    task.turns.append(Turn("teacher", "Still, the answer is (C)"))
    step(j, task)
    assert task.done and task.result is not None
    assert task.result["agreed"] and task.result["agreed_answer"] == "C" and not task.result["correct"]
    assert task.result["answers"] == {"teacher": ["B", "C"], "student": ["C"]} and task.result["turns"] == 3


def test_judge_stops_at_max_turns_without_agreement() -> None:
    j = judge(max_turns=2)
    task = Task(id="q1", row=ROW, next_role="judge", turns=[Turn("teacher", "The answer is (B)")])
    step(j, task)
    task.turns.append(Turn("student", "no idea"))
    step(j, task)
    assert task.done and task.result["agreed"] is False and task.result["final"] == {"teacher": "B", "student": None}


def test_speaker_rejects_malformed_choices_without_llm_call() -> None:
    sp = Speaker(AgentContext("teacher", {}))
    task = Task(id="x", row={"id": "x", "question": "q", "choices": "A or B", "answer": "A"}, next_role="teacher")
    asyncio.run(sp.step(task))
    assert task.error is not None and task.error.kind == "bad_input" and "choices" in task.error.message


def test_metrics() -> None:
    recs = [
        {"status": "ok", "usage": {"prompt_tokens": 10, "completion_tokens": 5}, "result": {"turns": 2, "agreed": True, "correct": True}},
        {"status": "ok", "usage": {"prompt_tokens": 10, "completion_tokens": 5}, "result": {"turns": 4, "agreed": False, "correct": False}},
        {"status": "failed", "usage": {"prompt_tokens": 0, "completion_tokens": 0}, "result": None},
    ]
    assert metrics(recs) == {
        "dialogues": 2,
        "failed": 1,
        "agreement_rate": 0.5,
        "agreement_correctness": 1.0,
        "mean_turns": 3.0,
        "prompt_tokens": 20,
        "completion_tokens": 10,
    }


def test_inline_roles_must_not_call_an_llm() -> None:
    from matrix_hpc.runtime.spec import ClientSpec, RoleSpec, TeamSpec
    from matrix_hpc.runtime.team import Team, TeamError

    roles = {
        "teacher": RoleSpec("workflows.collab_reasoning.agents:Speaker", 1, 1, inline=True, model="m"),
        "judge": RoleSpec("workflows.collab_reasoning.agents:Judge", 1, 1, inline=True),
    }
    spec = TeamSpec("r", "ns", roles, {"m": ClientSpec("m", "m", ["http://127.0.0.1:9/v1"])})
    with pytest.raises(TeamError, match="workflow.roles.teacher.inline: only roles that call no LLM"):
        Team(spec, "teacher", "/nonexistent", 8, 1.0, False)
