"""A task's wire form: it crosses a Ray call at every hop, so it must pickle flat and whole."""

from __future__ import annotations

import pickle
import pickletools
from dataclasses import asdict

from ray import cloudpickle

from matrix_hpc.runtime.task import Task, Turn


def _task(turns: int) -> Task:
    t = Task(id="q-1", row={"id": "q-1", "question": "why?"}, next_role="student", state={"answers": {"teacher": ["B"]}})
    for i in range(turns):
        t.turns.append(
            Turn(role="teacher", text=f"turn {i}", prompt_tokens=10, completion_tokens=5, endpoint="http://e/v1", model="m", max_tokens=64, temperature=0.5)
        )
    return t


def _object_builds(data: bytes) -> int:
    """Opcodes that build an object from a class or a function (what costs per object to unpickle)."""
    return sum(op.name in ("REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD", "OBJ", "INST") for op, _, _ in pickletools.genops(data))


def test_a_task_round_trips_whole_through_cloudpickle() -> None:
    t = _task(3)
    t.fail("agent_error", "boom", "teacher", ["f.py:1 in g: x"])
    t.routed = True
    back = pickle.loads(cloudpickle.dumps(t))
    assert back == t and back.routed and back.turns == t.turns and back.error == t.error
    assert isinstance(back.turns[0], Turn)
    assert pickle.loads(cloudpickle.dumps(t.turns[0])) == t.turns[0]


def test_the_history_pickles_as_plain_tuples_not_one_object_per_turn() -> None:
    """Unpickling cost does not grow with a class build per turn: 1 turn or 20, the same builds."""
    assert _object_builds(cloudpickle.dumps(_task(20))) == _object_builds(cloudpickle.dumps(_task(1)))


def test_the_record_matches_dataclasses_asdict() -> None:
    t = _task(2)
    t.fail("agent_error", "boom", "teacher", ["f.py:1 in g: x"])
    rec = t.to_record(finished_at=1.0)
    assert rec["turns"] == [asdict(x) for x in t.turns] and rec["error"] == asdict(t.error)  # type: ignore[arg-type]
