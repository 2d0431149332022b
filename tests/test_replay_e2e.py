"""Turn-level resume end to end: `matrix-hpc run` of long collab-reasoning dialogues
against a deterministic server that counts requests; the driver is SIGKILLed at a
random point and the same command re-run.

The server holds its answers for a moment before the kill, so "calls in flight at
the kill" is an exact count (requests received and not answered) rather than a guess.
"""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pytest

from matrix_hpc.procs import pid_alive
from matrix_hpc.store.journal import journal_size

from .conftest import BIN, committed_rows, job_config, questions, store_records, wait_for, write_jsonl
from .counting_llm import CountingLLM

pytestmark = pytest.mark.slow


@pytest.fixture
def server() -> Iterator[CountingLLM]:
    s = CountingLLM(delay_s=(0.03, 0.15)).start()
    yield s
    s.stop()


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


def test_driver_sigkill_then_rerun_replays_every_journaled_call(tmp_path: Path, server: CountingLLM, run_factory: Any) -> None:
    rows = questions(32)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    cfg = job_config(
        tmp_path, data, **{"llm.engine": "external", "llm.base_urls": [server.url], "workflow.params.max_turns": 8,
                           "run.max_in_flight": 8, "run.replay_compact_s": 0.5},
    )  # fmt: skip
    out, ref_out = tmp_path / "out", tmp_path / "ref"

    ref = run_factory(cfg, f"output.path={ref_out}")  # the uninterrupted run
    assert ref.wait(300) == 0, ref.output
    uninterrupted = server.received
    reference = dialogues(ref_out)
    assert Counter(len(d) for d in reference.values())[8] >= 12, "dialogues should mostly be long"

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
    first_life = server.received - uninterrupted
    first = store_records(out)
    journaled = sum(1 for _ in _entries(out / "journal"))

    rerun = run_factory(cfg)
    assert rerun.wait(300) == 0, rerun.output
    both = server.received - uninterrupted
    redone = both - uninterrupted
    print(f"\nkill after {kill_after} commits: requests uninterrupted {uninterrupted}, both lives {both} ({first_life} + {both - first_life}); "
          f"redone {redone}, in flight at the kill {in_flight}; journal peak {peak.stop()} bytes, {journaled} entries at the kill")  # fmt: skip
    assert redone <= in_flight, f"kill_after={kill_after}: {redone} calls redone, {in_flight} were in flight"

    records = store_records(out)
    assert sorted(r["id"] for r in records) == sorted(q["id"] for q in rows)  # every id once
    assert dialogues(out) == reference, "the resumed records differ from the uninterrupted run"
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


def _entries(journal: Path) -> Iterator[Any]:
    from matrix_hpc.store.journal import journal_files, read_entries

    for f in journal_files(journal):
        yield from read_entries(f)
