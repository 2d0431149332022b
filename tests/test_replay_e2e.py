"""Turn-level resume end to end: `matrix-hpc run` of long collab-reasoning dialogues
against a deterministic server that counts requests; the driver is SIGKILLed at a
random point and the same command re-run.

The server holds its answers for a moment before the kill, so "calls in flight at
the kill" is an exact count (requests received and not answered) rather than a guess.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from matrix_hpc.procs import pid_alive
from matrix_hpc.store.journal import journal_size

from .conftest import BIN, committed_rows, job_config, questions, store_records, wait_for, write_jsonl
from .counting_llm import CountingLLM

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server() -> Iterator[CountingLLM]:
    s = CountingLLM(delay_s=(0.03, 0.15)).start()
    yield s
    s.stop()


ROWS = questions(32)


def replay_config(tmp: Path, url: str) -> Path:
    data = write_jsonl(tmp / "data.jsonl", ROWS)
    return job_config(
        tmp, data, **{"llm.engine": "external", "llm.base_urls": [url], "workflow.params.max_turns": 8,
                      "run.max_in_flight": 8, "run.replay_compact_s": 0.5},
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference(server: CountingLLM, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, list[tuple[str, str]]]]:
    """The uninterrupted run: (LLM requests it made, its dialogues by id)."""
    tmp = tmp_path_factory.mktemp("reference")
    before = server.received
    res = subprocess.run(
        [str(BIN / "matrix-hpc"), "run", str(replay_config(tmp, server.url))], capture_output=True, text=True, timeout=300, start_new_session=True
    )
    assert res.returncode == 0, res.stdout + res.stderr
    dialogues_ = dialogues(tmp / "out")
    assert Counter(len(d) for d in dialogues_.values())[8] >= 12, "dialogues should mostly be long"
    return server.received - before, dialogues_


class PeakSize:
    """The journal's largest size on disk while it runs (sampled every 20 ms)."""

    def __init__(self, journal: Path) -> None:
        self.journal, self.peak, self._stop = journal, 0, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, journal_size(self.journal)[1])

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def dialogues(out: Path) -> dict[str, list[tuple[str, str]]]:
    return {r["id"]: [(t["role"], t["text"]) for t in r["turns"]] for r in store_records(out)}


def llm_calls(records: list[dict[str, Any]]) -> int:
    return sum(1 for r in records for t in r["turns"] if t["endpoint"])


def test_driver_sigkill_then_rerun_replays_every_journaled_call(tmp_path: Path, server: CountingLLM, reference: Any, run_factory: Any) -> None:
    rows = ROWS
    cfg = replay_config(tmp_path, server.url)
    out = tmp_path / "out"
    uninterrupted, ref_dialogues = reference
    start = server.received

    peak = PeakSize(out / "journal")
    kill_after = random.Random().randint(1, 12)  # a random point, printed on failure
    run = run_factory(cfg)
    wait_for(lambda: committed_rows(out) >= kill_after, 240, f"{kill_after} committed rows", run)
    server.freeze()  # answers sent so far reach the journal; the rest are in flight
    time.sleep(1.0)
    actors = json.loads((out / "run.json").read_text())["actors"]
    run.kill()
    run.cleanup()
    # The actors outlive the driver for a moment (until Ray notices): answers stay held
    # until they are gone, so what they had asked counts as in flight, not as done.
    wait_for(lambda: not any(pid_alive(p) for p in actors.values()), 120, "the first life's actors to exit")
    in_flight = server.in_flight
    server.thaw()
    first_life = server.received - start
    first = store_records(out)
    journaled = sum(1 for _ in _entries(out / "journal"))

    rerun = run_factory(cfg)
    assert rerun.wait(300) == 0, rerun.output
    both = server.received - start
    redone = both - uninterrupted
    print(f"\nkill after {kill_after} commits: requests uninterrupted {uninterrupted}, both lives {both} ({first_life} + {both - first_life}); "
          f"redone {redone}, in flight at the kill {in_flight}; journal peak {peak.stop()} bytes, {journaled} entries at the kill")  # fmt: skip
    assert redone <= in_flight, f"kill_after={kill_after}: {redone} calls redone, {in_flight} were in flight"

    records = store_records(out)
    assert sorted(r["id"] for r in records) == sorted(q["id"] for q in rows)  # every id once
    assert dialogues(out) == ref_dialogues, "the resumed records differ from the uninterrupted run"
    replayed = [t for r in records for t in r["turns"] if t["replayed"]]
    # Every call answered in the first life for a task it did not commit is replayed, once.
    assert len(replayed) == first_life - in_flight - llm_calls(first) > 0, (kill_after, len(replayed), first_life, in_flight, llm_calls(first))
    for r in records:  # replayed turns are where the dialogue was when killed: a prefix
        marks = [t["replayed"] for t in r["turns"]]
        assert marks == sorted(marks, reverse=True), r["id"]

    status = subprocess.run([str(BIN / "matrix-hpc"), "status", str(out)], capture_output=True, text=True, timeout=60)
    assert f"replayed:  {len(replayed)} LLM calls from the journal" in status.stdout and "in the last life" in status.stdout, status.stdout
    assert journal_size(out / "journal") == (0, 0), "a finished run left its journal behind"
    history = json.loads((out / "run.json").read_text())["history"]
    assert history[-1]["replayed"] == len(replayed)


def test_a_killed_agent_actor_replays_the_calls_of_the_tasks_it_lost(tmp_path: Path, server: CountingLLM, reference: Any, run_factory: Any) -> None:
    """Within one life: Ray restarts a SIGKILLed actor and the driver re-sends the tasks it
    held; their earlier turns come from the dead incarnation's journal file (read by the new
    one) and from the other actor's own file."""
    cfg = replay_config(tmp_path, server.url)
    out = tmp_path / "out"
    uninterrupted, ref_dialogues = reference
    start = server.received
    run = run_factory(cfg)
    kill_after = random.Random().randint(1, 10)
    wait_for(lambda: committed_rows(out) >= kill_after and "actors" in json.loads((out / "run.json").read_text()), 240, f"{kill_after} commits", run)
    actors = json.loads((out / "run.json").read_text())["actors"]
    (teacher,) = [pid for name, pid in actors.items() if name.endswith("/teacher/0")]
    # Kill while the teacher holds a task past its first turn (its earlier calls are in the
    # journal): a moment when it holds only new tasks has nothing to replay, and chancing it
    # failed a loaded fresh-clone run with "replayed 0".
    for _ in range(200):
        server.freeze()
        time.sleep(0.5)
        if any("Your turn (teacher)" in p and "Discussion so far" in p for p in server.held_prompts()):
            break
        server.thaw()
        time.sleep(0.2)
    else:
        pytest.fail("the teacher never held a task past its first turn")
    os.kill(teacher, signal.SIGKILL)
    wait_for(lambda: not pid_alive(teacher), 60, "the teacher actor to exit")
    in_flight = server.in_flight  # the student's held calls are answered after the thaw, not redone
    server.thaw()
    assert run.wait(300) == 0, run.output
    assert "re-sent" in run.output, run.output
    records = store_records(out)
    redone = server.received - start - uninterrupted
    replayed = sum(t["replayed"] for r in records for t in r["turns"])
    print(f"\nactor kill after {kill_after} commits: redone {redone}, in flight at the kill {in_flight}, replayed {replayed}")
    assert redone <= in_flight
    assert dialogues(out) == ref_dialogues
    assert replayed > 0 and max(r["attempt"] for r in records) == 2


def _entries(journal: Path) -> Iterator[Any]:
    from matrix_hpc.store.journal import journal_files, read_entries

    for f in journal_files(journal):
        yield from read_entries(f)
