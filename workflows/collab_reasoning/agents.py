"""Collaborative reasoning (Collaborative Reasoner style).

Two speakers (a teacher and a student) take turns on a multiple-choice question.
After every turn the judge, which calls no LLM, extracts the speaker's answer
("The answer is (X)") and ends the task when both sides' latest answers agree or
when ``max_turns`` is reached; otherwise it routes the task to the other speaker.

Flow: teacher → judge → student → judge → teacher → … → finished.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from matrix_hpc.agents import Agent, Task

__all__ = ["Speaker", "Judge", "extract_answer", "metrics"]

_ANSWER = re.compile(r"answer\s*(?:is|:)?\s*:?\s*\(?\s*([A-Z])\s*\)", re.IGNORECASE)
_BARE = re.compile(r"\(([A-Z])\)")


def extract_answer(text: str, n_choices: int) -> str | None:
    """The last "The answer is (X)" in ``text`` (else the last "(X)"), if X is a valid letter."""
    valid = string.ascii_uppercase[:n_choices]
    for pattern in (_ANSWER, _BARE):
        hits = [m.upper() for m in pattern.findall(text) if m.upper() in valid]
        if hits:
            return hits[-1]
    return None


def _check_row(row: dict[str, Any]) -> str | None:
    choices = row.get("choices")
    if not isinstance(choices, list) or not 2 <= len(choices) <= 26 or not all(isinstance(c, str) for c in choices):
        return "field 'choices' must be a list of 2 to 26 strings"
    gold = row.get("answer")
    if not isinstance(gold, str) or gold not in string.ascii_uppercase[: len(choices)]:
        return f"field 'answer' must be one of {string.ascii_uppercase[: len(choices)]}, got {gold!r}"
    return None


def _format_question(row: dict[str, Any]) -> str:
    lines = [f"Question: {row['question']}"]
    lines += [f"({letter}) {choice}" for letter, choice in zip(string.ascii_uppercase, row["choices"])]
    return "\n".join(lines)


class Speaker(Agent):
    """One side of the discussion."""

    @dataclass
    class Params:
        persona: str = ""
        """Who this speaker is (default: the role's name)."""
        partner: str = "partner"
        """Who it talks with."""
        judge: str = "judge"
        """The role that reads each reply."""

    async def step(self, task: Task) -> None:
        if not task.turns:
            problem = _check_row(task.row)
            if problem:
                task.fail("bad_input", f"row {task.id}: {problem}", self.role)
                return
        persona = self.params.persona or self.role
        partner = self.params.partner
        system = (
            f"You are a {persona} discussing a multiple-choice question with a {partner}. "
            "Reason briefly, respond to what was said, and end your reply with "
            "'The answer is (X)' where X is the letter of your choice."
        )
        dialogue = "\n".join(f"{t.role.capitalize()}: {t.text.strip()}" for t in task.turns)
        prompt = _format_question(task.row)
        if dialogue:
            prompt += f"\n\nDiscussion so far:\n{dialogue}"
        prompt += f"\n\nYour turn ({self.role}). Reply in at most three sentences."
        await self.chat(task, [{"role": "system", "content": system}, {"role": "user", "content": prompt}])
        task.next_role = self.params.judge


class Judge(Agent):
    """Extracts answers and decides: agreement, turn limit, or the other speaker's turn."""

    uses_llm = False

    @dataclass
    class Params:
        speakers: list[str] = field(default_factory=lambda: ["teacher", "student"])
        """The two speakers' role names; the first one opens."""
        max_turns: int = 4
        """Turns (both speakers') after which the dialogue ends without agreement."""

    async def step(self, task: Task) -> None:
        speakers: list[str] = self.params.speakers
        max_turns = self.params.max_turns
        last = task.turns[-1]
        answers: dict[str, list[str | None]] = task.state.setdefault("answers", {s: [] for s in speakers})
        answers.setdefault(last.role, []).append(extract_answer(last.text, len(task.row["choices"])))
        latest = {s: (answers.get(s) or [None])[-1] for s in speakers}
        agreed = all(latest.values()) and len(set(latest.values())) == 1
        if agreed or len(task.turns) >= max_turns:
            agreed_answer = latest[speakers[0]] if agreed else None
            task.finish(
                {
                    "question": task.row["question"],
                    "choices": task.row["choices"],
                    "gold": task.row["answer"],
                    "dialogue": [{"role": t.role, "text": t.text} for t in task.turns],
                    "answers": answers,
                    "final": latest,
                    "agreed": agreed,
                    "agreed_answer": agreed_answer,
                    "correct": agreed and agreed_answer == task.row["answer"],
                    "turns": len(task.turns),
                }
            )
            return
        task.next_role = speakers[1] if last.role == speakers[0] else speakers[0]


def metrics(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Agreement rate, agreement correctness, mean turns and tokens over a run's records."""
    n = failed = agreed = correct = turns = prompt = completion = 0
    for rec in records:
        usage = rec.get("usage") or {}
        prompt += usage.get("prompt_tokens", 0)
        completion += usage.get("completion_tokens", 0)
        if rec["status"] != "ok":
            failed += 1
            continue
        res = rec["result"]
        n += 1
        turns += res["turns"]
        agreed += bool(res["agreed"])
        correct += bool(res["correct"])
    return {
        "dialogues": n,
        "failed": failed,
        "agreement_rate": round(agreed / n, 3) if n else None,
        "agreement_correctness": round(correct / agreed, 3) if agreed else None,
        "mean_turns": round(turns / n, 2) if n else None,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
    }
