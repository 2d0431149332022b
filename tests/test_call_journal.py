"""The call journal's owner (store/call_journal.py) on real files, without a team or Ray:
its lifecycle across lives, and what a crash at each step leaves (see the module docstring).

A crash inside a step is a real SIGKILL where it can be (a writer killed mid-stream), else the
step's file operation raising at that point, which leaves the disk exactly as a kill there would."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from matrix_hpc.store import call_journal
from matrix_hpc.store.call_journal import CallJournal
from matrix_hpc.store.journal import JournalEntry, journal_files, read_entries
from matrix_hpc.store.layout import RunLayout

REPO = Path(__file__).resolve().parents[1]


class Crash(Exception):
    """Where a kill would have stopped the process."""


def entry(n: int, task: str) -> JournalEntry:
    return JournalEntry(f"d{n:05d}", task, {"n": n})


def journal(tmp_path: Path, run_id: str) -> CallJournal:
    return CallJournal(RunLayout(tmp_path).journal, run_id)


def on_disk(j: CallJournal) -> dict[str, set[str]]:
    """Task id -> digests of every whole entry in every journal file (a duplicate counted once)."""
    out: dict[str, set[str]] = {}
    for path in journal_files(j.dir):
        for _, _, e in read_entries(path):
            out.setdefault(e.task_id, set()).add(e.digest)
    return out


def write_life(j: CallJournal, per_incarnation: dict[str, list[JournalEntry]], close: bool = True) -> None:
    """One life's incarnations, each writing its entries (flushed: the calls were paid and saved)."""

    async def main() -> None:
        for inc, entries in per_incarnation.items():
            seg = j.open_segment("teacher", 0, inc)
            for e in entries:
                seg.append(e)
            await seg.flush()
            if close:
                await seg.close()

    asyncio.run(main())


def test_two_lives_keep_the_calls_of_unfinished_tasks_and_a_finished_run_removes_them(tmp_path: Path) -> None:
    life1 = journal(tmp_path, "r1")
    assert life1.start_life(set()).files == 0 and life1.dir == RunLayout(tmp_path).journal
    # An actor and its restarted incarnation: the second reads the first's file, writes its own.
    write_life(life1, {"aaaaaaaa": [entry(i, f"t{i % 3}") for i in range(6)]})

    async def restarted() -> None:
        seg = life1.open_segment("teacher", 0, "bbbbbbbb")
        assert seg.get("d00004") is not None  # the dead incarnation's call answers
        seg.append(entry(6, "t0"))
        await seg.flush()
        assert seg.get("d00006") is not None  # and its own
        await seg.close()

    asyncio.run(restarted())
    assert sorted(p.name for p in journal_files(life1.dir)) == ["r1-teacher-0-aaaaaaaa.jnl", "r1-teacher-0-bbbbbbbb.jnl"]

    life2 = journal(tmp_path, "r2")
    start = life2.start_life({"t1"})  # t1 was committed: none of its calls is kept
    assert (start.files, start.kept) == (2, 5) and 0 < start.bytes_kept < start.bytes_before
    assert [p.name for p in journal_files(life2.dir)] == ["base-r2.jnl"]
    assert on_disk(life2) == {"t0": {"d00000", "d00003", "d00006"}, "t2": {"d00002", "d00005"}}

    async def resumed() -> None:
        seg = life2.open_segment("teacher", 0, "cccccccc")
        assert seg.get("d00003") is not None and seg.get("d00001") is None  # a committed task's call is not replayed
        await seg.close()

    asyncio.run(resumed())
    life2.remove()
    assert not life2.dir.exists()


def test_a_writer_killed_mid_stream_loses_no_flushed_call(tmp_path: Path) -> None:
    """Step 3: SIGKILL while a segment appends; every call it reported flushed is kept by the
    next life, and the torn tail is not read."""
    j = journal(tmp_path, "r1")
    j.start_life(set())
    script = (
        "import asyncio, sys\n"
        "from matrix_hpc.store.call_journal import CallJournal\n"
        "from matrix_hpc.store.journal import JournalEntry\n"
        "async def main():\n"
        "    seg = CallJournal(sys.argv[1], 'r1', flush_interval_s=0.001).open_segment('teacher', 0, 'aaaaaaaa')\n"
        "    i = 0\n"
        "    while True:\n"
        "        for k in range(5):\n"
        "            seg.append(JournalEntry(f'd{i + k:05d}', f't{(i + k) % 7}', {'pad': 'x' * 500}))\n"
        "        await seg.flush()\n"
        "        i += 5\n"
        "        print(i, flush=True)\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(j.dir)], stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    try:
        assert proc.stdout is not None
        flushed = 0
        while flushed < 200:  # well into the stream: the kill lands wherever the writer is
            line = proc.stdout.readline()
            assert line, "the writer ended on its own"
            flushed = int(line)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    (seg,) = journal_files(j.dir)
    with open(seg, "ab") as fh:  # and a torn frame, as a kill inside a write leaves
        fh.write(b"MJ\x40\x00\x00\x00garbage")
    start = journal(tmp_path, "r2").start_life(set())
    digests = set().union(*on_disk(journal(tmp_path, "r2")).values())
    assert {f"d{i:05d}" for i in range(flushed)} <= digests
    assert start.kept == len(digests)  # whole entries only, each once


def test_a_merge_killed_before_its_rename_leaves_the_old_files_and_the_next_start_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Step 1, killed before the merged file replaces anything: the old files are intact, the
    temp file is no journal file, and the next life's merge keeps the same calls and removes it."""
    write_life(journal(tmp_path, "r1"), {"aaaaaaaa": [entry(i, f"t{i % 2}") for i in range(4)]})
    before = on_disk(journal(tmp_path, "r1"))

    def crash(*_: object) -> None:
        raise Crash

    with monkeypatch.context() as m:
        m.setattr(os, "replace", crash)
        with pytest.raises(Crash):
            journal(tmp_path, "r2").start_life(set())
    j = journal(tmp_path, "r3")
    assert [p.name for p in j.dir.iterdir() if p.name.endswith(".tmp")] == [".base-r2.jnl.tmp"]
    assert on_disk(j) == before  # nobody reads the temp file
    assert j.start_life(set()).kept == 4
    assert sorted(p.name for p in j.dir.iterdir()) == ["base-r3.jnl"] and on_disk(j) == before


def test_a_merge_killed_after_its_rename_leaves_duplicates_that_the_next_merge_folds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Step 1, killed after the rename, before the sources are removed: the merged file and its
    sources both hold the calls (each still answers the same call); the next merge keeps each once."""
    write_life(journal(tmp_path, "r1"), {"aaaaaaaa": [entry(i, f"t{i % 2}") for i in range(4)], "bbbbbbbb": [entry(9, "t1")]})
    real_unlink = Path.unlink

    def crash(self: Path, missing_ok: bool = False) -> None:
        if self.name.endswith(".jnl"):
            raise Crash
        real_unlink(self, missing_ok=missing_ok)

    with monkeypatch.context() as m:
        m.setattr(Path, "unlink", crash)
        with pytest.raises(Crash):
            journal(tmp_path, "r2").start_life({"t0"})
    j = journal(tmp_path, "r3")
    assert sorted(p.name for p in journal_files(j.dir)) == ["base-r2.jnl", "r1-teacher-0-aaaaaaaa.jnl", "r1-teacher-0-bbbbbbbb.jnl"]
    start = j.start_life({"t0"})
    assert start.kept == 3 and [p.name for p in journal_files(j.dir)] == ["base-r3.jnl"]
    assert on_disk(j) == {"t1": {"d00001", "d00003", "d00009"}}


def test_a_segment_opened_and_killed_before_writing_is_read_as_empty(tmp_path: Path) -> None:
    """Step 2: an incarnation killed right after it created its file."""
    j = journal(tmp_path, "r1")
    j.start_life(set())
    write_life(j, {"aaaaaaaa": [entry(0, "t0")]})
    j.open_segment("teacher", 0, "bbbbbbbb")  # never written, never closed: the process died
    assert j.segment_path("teacher", 0, "bbbbbbbb").stat().st_size == 0
    start = journal(tmp_path, "r2").start_life(set())
    assert (start.files, start.kept) == (2, 1)


def test_a_compaction_killed_before_its_rename_keeps_the_segment_and_later_ones_go_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Step 4: the rewrite dies before it replaces the segment: the segment is intact, its temp
    file is cleaned up by the next life; a compaction that completes drops only committed tasks,
    and a reader that opened the file before still reads it whole."""
    j = journal(tmp_path, "r1")
    j.start_life(set())

    async def committed(ids: list[str]) -> list[str]:
        return [i for i in ids if i == "t0"]

    async def main() -> None:
        seg = j.open_segment("teacher", 0, "aaaaaaaa")
        for i in range(6):
            seg.append(entry(i, f"t{i % 3}"))
        await seg.flush()

        def crash(*_: object) -> None:
            raise OSError("killed here")  # _rewrite runs on a thread: a kill there stops at the rename

        with monkeypatch.context() as m:
            m.setattr(os, "replace", crash)
            assert await seg.compact(committed) == 0
        assert {e.task_id for _, _, e in read_entries(seg.path)} == {"t0", "t1", "t2"}
        assert (j.dir / f".{seg.path.name}.tmp").exists()

        reader = j.open_segment("teacher", 0, "bbbbbbbb")  # a restarted incarnation, indexed before
        assert await seg.compact(committed) == 2
        assert {e.task_id for _, _, e in read_entries(seg.path)} == {"t1", "t2"}
        assert reader.get("d00000") is not None  # it holds the old file open
        await reader.close()
        await seg.close()

    asyncio.run(main())
    assert journal(tmp_path, "r2").start_life(set()).kept == 4
    assert sorted(p.name for p in j.dir.iterdir()) == ["base-r2.jnl"]


def test_compaction_every_interval_survives_a_failing_round(tmp_path: Path) -> None:
    """Step 4's loop: a round whose question fails (a restarting sink) is tried again later."""
    j = journal(tmp_path, "r1")
    j.start_life(set())
    asked: list[list[str]] = []

    async def committed(ids: list[str]) -> list[str]:
        asked.append(ids)
        if len(asked) == 1:
            raise ConnectionError("the sink is restarting")
        return ids

    async def main() -> None:
        seg = j.open_segment("teacher", 0, "aaaaaaaa")
        seg.append(entry(0, "t0"))
        await seg.flush()
        loop = asyncio.create_task(seg.compact_every(0.01, committed))
        deadline = time.monotonic() + 60
        while seg.writer.task_ids() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert not loop.done() and seg.writer.task_ids() == [] and len(asked) >= 2
        loop.cancel()
        await seg.close()

    asyncio.run(main())


def test_a_graceful_stop_flushes_every_queued_call(tmp_path: Path) -> None:
    """Step 5: calls queued (not yet flushed) when the actor closes are on disk after close()."""
    j = journal(tmp_path, "r1")
    j.start_life(set())

    async def main() -> None:
        seg = j.open_segment("teacher", 0, "aaaaaaaa")
        for i in range(20):
            seg.append(entry(i, "t0"))
        await seg.close()

    asyncio.run(main())
    assert len(on_disk(j)["t0"]) == 20


def test_a_removal_killed_midway_leaves_nothing_the_next_life_keeps(tmp_path: Path) -> None:
    """Step 6 cut short (some files removed, not the folder): every task is committed, so a
    re-run of the finished job keeps none of what is left."""
    write_life(journal(tmp_path, "r1"), {"aaaaaaaa": [entry(0, "t0")], "bbbbbbbb": [entry(1, "t1")]})
    j = journal(tmp_path, "r1")
    journal_files(j.dir)[0].unlink()  # where the kill stopped the removal
    start = journal(tmp_path, "r2").start_life({"t0", "t1"})
    assert (start.files, start.kept) == (1, 0) and journal_files(j.dir) == []


def test_the_owner_names_every_journal_file(tmp_path: Path) -> None:
    """Only the owner names the journal's files: the base of a life and one file per incarnation."""
    j = journal(tmp_path, "r9")
    assert j.base == tmp_path / "journal" / "base-r9.jnl"
    assert j.segment_path("teacher", 2, "0123456789abcdef") == tmp_path / "journal" / "r9-teacher-2-01234567.jnl"
    source = (REPO / "matrix_hpc").rglob("*.py")
    spelled = [p.name for p in source if p != Path(call_journal.__file__) and ('f"base-' in p.read_text() or "-{index}-{" in p.read_text())]
    assert spelled == [], f"journal file names built outside store/call_journal.py: {spelled}"
