"""Replay through the real agent code: the collab-reasoning speakers, the real chat
client, a deterministic counting server and the journal on disk. Each "life" is a
fresh :class:`Replay` (a new actor incarnation) over the same journal folder."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from matrix_hpc import metrics
from matrix_hpc.agents import AgentContext, Task
from matrix_hpc.config import Sampling
from matrix_hpc.runtime.replay import Replay
from matrix_hpc.services.llm import ChatClient
from matrix_hpc.store.call_journal import CallJournal
from workflows.collab_reasoning.agents import Speaker

from .conftest import questions
from .counting_llm import CountingLLM


@pytest.fixture
def server() -> Iterator[CountingLLM]:
    s = CountingLLM(delay_s=(0.0, 0.01)).start()
    yield s
    s.stop()


def life(server: CountingLLM, journal: Path, name: str, turns: int, task_id: str = "q1", temperature: float = 0.7, persona: str = "patient teacher") -> Task:
    """Run ``turns`` speaker turns of one dialogue (teacher, student, ...) in a fresh incarnation."""

    async def main() -> Task:
        client = ChatClient([server.url], "m1")
        segment = CallJournal(journal, "r").open_segment(name, 0, "0")  # a new incarnation's file
        replay = Replay(segment)
        speakers = [
            Speaker(AgentContext(role, {"persona": p}, client, Sampling(max_tokens=24, temperature=temperature), replay=replay))
            for role, p in (("teacher", persona), ("student", "curious student"))
        ]
        task = Task(id=task_id, row=questions(1)[0], next_role="teacher")
        for i in range(turns):
            await speakers[i % 2].step(task)
        await segment.close()
        await client.close()
        return task

    return asyncio.run(main())


def texts(task: Task) -> list[str]:
    return [t.text for t in task.turns]


def test_a_resumed_dialogue_replays_its_calls_and_continues(server: CountingLLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = tmp_path / "journal"
    first = life(server, journal, "life1", 3)  # killed after three turns
    assert server.received == 3 and not any(t.replayed for t in first.turns)
    counted: list[tuple[Any, ...]] = []
    monkeypatch.setattr(metrics, "inc", lambda name, value=1.0, *tags: counted.append((name, value, *tags)))
    second = life(server, journal, "life2", 6)  # resumed: three replayed, three new
    assert [c for c in counted if c[0] == "replayed_calls"] == [
        ("replayed_calls", 1, "teacher", "m1"),
        ("replayed_calls", 1, "student", "m1"),
        ("replayed_calls", 1, "teacher", "m1"),
    ]
    assert server.received == 6, "a journaled call was paid for twice"
    assert [t.replayed for t in second.turns] == [True] * 3 + [False] * 3
    assert texts(second)[:3] == texts(first)
    for old, new in zip(first.turns, second.turns):  # the original usage and latency
        assert (new.prompt_tokens, new.completion_tokens, new.latency_s, new.started_at) == (
            old.prompt_tokens,
            old.completion_tokens,
            old.latency_s,
            old.started_at,
        )
    reference = life(server, tmp_path / "other-journal", "ref", 6)  # an uninterrupted run
    assert texts(second) == texts(reference)


@pytest.mark.parametrize(
    "change",
    [{"persona": "strict teacher"}, {"temperature": 0.2}, {"task_id": "q2"}],
    ids=["changed prompt", "changed sampling", "another task"],
)
def test_a_changed_request_misses_the_journal(server: CountingLLM, tmp_path: Path, change: dict[str, Any]) -> None:
    journal = tmp_path / "journal"
    life(server, journal, "life1", 2)
    again = life(server, journal, "life2", 2, **change)
    assert server.received == 4, "a changed request was answered from the journal"
    assert not any(t.replayed for t in again.turns)


def test_replay_off_calls_the_llm_every_time(server: CountingLLM, tmp_path: Path) -> None:
    async def main() -> Task:
        client = ChatClient([server.url], "m1")
        agent = Speaker(AgentContext("teacher", {}, client, Sampling(max_tokens=24)))  # no journal
        task = Task(id="q1", row=questions(1)[0], next_role="teacher")
        await agent.step(task)
        await client.close()
        return task

    asyncio.run(main())
    asyncio.run(main())
    assert server.received == 2
