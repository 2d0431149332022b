"""Explain and grade: the example workflow of docs/writing-a-workflow.md.

Flow: writer (LLM) -> checker (rules, no LLM) -> grader (another LLM) -> finished.
The checker sends a too-short explanation back to the writer, at most ``max_tries`` times.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from matrix_hpc.agents import Agent, Task


class Writer(Agent):
    """Explains the row's concept in two sentences, with the role's model and sampling."""

    async def step(self, task: Task) -> None:
        tries = task.state.get("tries", 0)
        hint = f" Use the word '{task.row['keyword']}'." if tries else ""
        text = await self.chat(task, [
            {"role": "system", "content": "You explain things to a child in two short sentences."},
            {"role": "user", "content": f"Explain {task.row['concept']}.{hint}"},
        ])  # fmt: skip
        task.state.update(tries=tries + 1, explanation=text.strip())  # per-task data lives on the task
        task.next_role = "checker"


class Checker(Agent):
    """Rules only."""

    uses_llm = False

    @dataclass
    class Params:  # the role's params, checked before the run starts: a typo is a config error
        min_chars: int = 20
        max_tries: int = 2

    async def step(self, task: Task) -> None:
        st, p = task.state, self.params  # self.params: settings shared by every task
        if len(st["explanation"]) >= p.min_chars:
            task.next_role = "grader"
        elif st["tries"] < p.max_tries:
            task.next_role = "writer"  # try again
        else:
            task.finish({**summary(task), "accepted": False, "reason": f"shorter than {p.min_chars} characters"})


class Grader(Agent):
    """Asks its own model whether the explanation is right: yes or no."""

    async def step(self, task: Task) -> None:
        question = f"Is this a correct explanation of {task.row['concept']}?\n\n{task.state['explanation']}\n\nAnswer yes or no."
        reply = await self.chat(task, [{"role": "user", "content": question}])
        task.finish({**summary(task), "accepted": True, "grade": "yes" if reply.strip().lower().startswith("yes") else "no"})


def summary(task: Task) -> dict[str, Any]:
    text = task.state["explanation"]
    return {"explanation": text, "tries": task.state["tries"], "mentions_keyword": task.row["keyword"].lower() in text.lower()}


def metrics(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    results = [r["result"] for r in records if r["status"] == "ok"]
    graded = [r for r in results if r["accepted"]]
    return {
        "accepted": len(graded),
        "rejected": len(results) - len(graded),
        "graded_yes": sum(r["grade"] == "yes" for r in graded),
        "mentions_keyword": sum(r["mentions_keyword"] for r in results),
    }
