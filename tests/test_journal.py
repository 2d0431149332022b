"""The call journal on its own: group commit, torn tails, compaction, a failing disk."""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import random
import signal
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path
from typing import Any

import pytest

from matrix_hpc.store.journal import JournalEntry, JournalIndex, JournalWriter, compact_journal, encode, journal_size, read_entries

from .conftest import REPO


def entry(i: int, task: str | None = None, size: int = 40) -> JournalEntry:
    return JournalEntry(f"d{i:05d}", task or f"t{i % 7}", {"text": f"answer {i} " + "x" * size, "n": i})


def test_concurrent_appends_are_group_committed_and_read_back(tmp_path: Path) -> None:
    async def main() -> JournalWriter:
        w = JournalWriter(tmp_path / "a.jnl", flush_interval_s=0.01)
        await asyncio.gather(*(w.append(entry(i)) for i in range(500)))
        assert all(w.get(f"d{i:05d}").payload["n"] == i for i in range(500))  # type: ignore[union-attr]
        await w.close()
        return w

    w = asyncio.run(main())
    assert w.entries == 500 and w.flushes < 50, (w.entries, w.flushes)  # batched: far fewer fsyncs than entries
    got = [e for _, _, e in read_entries(tmp_path / "a.jnl")]
    assert [e.payload["n"] for e in got] == list(range(500))
    index = JournalIndex(tmp_path)
    assert len(index) == 500 and index.get("d00123").payload["n"] == 123  # type: ignore[union-attr]
    assert index.get("nope") is None
    assert journal_size(tmp_path) == (1, (tmp_path / "a.jnl").stat().st_size)


def test_a_torn_last_entry_is_ignored_at_every_offset(tmp_path: Path) -> None:
    whole = b"".join(encode(entry(i, size=random.randint(0, 300))) for i in range(5))
    last = encode(entry(99, size=200))
    path = tmp_path / "t.jnl"
    for cut in range(len(last)):  # a kill anywhere inside the write of the last entry
        path.write_bytes(whole + last[:cut])
        assert [e.digest for _, _, e in read_entries(path)] == [f"d{i:05d}" for i in range(5)], cut
    for tail in (b"\0" * 64, b"MJ\xff\xff\xff\x7f", os.urandom(100)):  # zero-filled blocks, a huge length, garbage
        path.write_bytes(whole + tail)
        assert len(list(read_entries(path))) == 5
    flipped = bytearray(whole + last)
    flipped[-3] ^= 0xFF  # a bad byte in the payload: its crc no longer matches
    path.write_bytes(bytes(flipped))
    assert len(list(read_entries(path))) == 5
    index = JournalIndex(tmp_path)
    assert index.get("d00004") is not None and index.get("d00099") is None


_WRITER = """
import asyncio, signal, sys
from matrix_hpc.store.journal import JournalEntry, JournalWriter
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it; the kernel's default is a kill
async def main():
    w = JournalWriter(sys.argv[1], flush_interval_s=0.002)
    i = 0
    while True:
        batch = [w.append(JournalEntry(f"d{i + k:06d}", "t", {"n": i + k, "pad": "y" * (300 * (k + 1))})) for k in range(8)]
        await asyncio.gather(*batch)
        i += 8
        print(i, flush=True)  # entries [0, i) are durable
asyncio.run(main())
"""


def _limit_file_size(limit: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_writer_killed_inside_a_write_leaves_every_acknowledged_entry_readable(tmp_path: Path) -> None:
    # RLIMIT_FSIZE at a random byte offset: the kernel writes up to it and kills the
    # writer (SIGXFSZ) in the middle of that write, i.e. inside an entry, mid-batch.
    rng = random.Random()
    for run in range(8):
        path = tmp_path / f"w{run}.jnl"
        limit = rng.randint(1, 200_000)
        res = subprocess.run(
            [sys.executable, "-c", _WRITER, str(path)], capture_output=True, text=True, cwd=REPO, timeout=60,
            env={**os.environ, "PYTHONPATH": str(REPO)}, preexec_fn=lambda: _limit_file_size(limit),
        )  # fmt: skip
        assert res.returncode == -signal.SIGXFSZ, (res.returncode, res.stderr[-2000:])
        acked = int(res.stdout.split()[-1]) if res.stdout.strip() else 0
        got = [e.payload["n"] for _, _, e in read_entries(path)]
        whole = sum(size for _, size, _ in read_entries(path))
        assert path.stat().st_size == limit, f"run {run}: the kill was not at byte {limit}"
        assert got == list(range(len(got))), f"run {run} (cut at byte {limit}): entries are not a prefix"
        assert acked <= len(got) <= acked + 8, f"run {run} (cut at byte {limit}): {acked} acknowledged, {len(got)} readable"
        assert whole <= limit


def test_writer_compaction_drops_committed_tasks_and_old_readers_still_read(tmp_path: Path) -> None:
    async def main() -> None:
        w = JournalWriter(tmp_path / "w.jnl")
        await asyncio.gather(*(w.append(entry(i, task=f"t{i % 4}")) for i in range(40)))
        before = JournalIndex(tmp_path)  # e.g. a restarted actor that indexed this file earlier
        size = w.size
        assert await w.compact({"t0", "t1"}) == 20
        assert w.size < size and set(w.task_ids()) == {"t2", "t3"}
        assert w.get("d00000") is None and w.get("d00002").payload["n"] == 2  # type: ignore[union-attr]
        await w.append(entry(1000, task="t2"))  # appends go on after the rewrite
        assert w.get("d01000") is not None
        assert before.get("d00000") is not None  # its file is the old one: offsets stay valid
        await w.close()
        assert {e.task_id for _, _, e in read_entries(tmp_path / "w.jnl")} == {"t2", "t3"}

    asyncio.run(main())


def test_life_start_compaction_keeps_unfinished_tasks_only(tmp_path: Path) -> None:
    a, b = tmp_path / "r1-a.jnl", tmp_path / "r1-b.jnl"
    a.write_bytes(b"".join(encode(entry(i, task=f"t{i % 3}")) for i in range(9)) + b"MJ\x01")  # torn tail
    b.write_bytes(b"".join(encode(entry(i, task=f"t{i % 3}")) for i in range(6, 12)))  # overlaps a: kept once
    kept, size = compact_journal(tmp_path, lambda t: t != "t0", "base-r2.jnl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base-r2.jnl"]
    got = [e for _, _, e in read_entries(tmp_path / "base-r2.jnl")]
    assert kept == len(got) == 8 and size == (tmp_path / "base-r2.jnl").stat().st_size
    assert {e.task_id for e in got} == {"t1", "t2"} and len({e.digest for e in got}) == 8
    assert compact_journal(tmp_path, lambda t: False, "base-r3.jnl") == (0, 0)
    assert list(tmp_path.iterdir()) == []  # all tasks done: the journal is empty


def test_a_disk_error_disables_the_writer_and_never_fails_the_call(tmp_path: Path) -> None:
    async def main() -> JournalWriter:
        w = JournalWriter("/dev/full")  # every write fails with ENOSPC
        await asyncio.wait_for(asyncio.gather(*(w.append(entry(i)) for i in range(10))), 5)
        await w.append(entry(11))  # returns at once once disabled
        await w.close()
        return w

    w = asyncio.run(main())
    assert w.disabled is not None and "/dev/full" in w.disabled and "space" in w.disabled.lower()
    assert w.entries == 0 and w.get("d00001") is None


def test_append_nowait_does_not_wait_and_flush_makes_it_durable(tmp_path: Path) -> None:
    async def main() -> None:
        w = JournalWriter(tmp_path / "n.jnl")
        futs = [w.append_nowait(entry(i)) for i in range(100)]
        assert not any(f.done() for f in futs) and (tmp_path / "n.jnl").stat().st_size == 0  # queued, not written
        await w.flush()
        assert all(f.done() for f in futs)
        assert len(list(read_entries(tmp_path / "n.jnl"))) == 100  # on disk before close
        await w.close()

    asyncio.run(main())


def test_entries_of_one_flush_share_one_future(tmp_path: Path) -> None:
    """The hot path pays no future per LLM call: entries queued for the same flush share one."""

    async def main() -> None:
        w = JournalWriter(tmp_path / "f.jnl", flush_interval_s=0.01)
        futs = [w.append_nowait(entry(i)) for i in range(100)]
        assert all(f is futs[0] for f in futs) and not futs[0].done()
        await w.flush()
        assert futs[0].done() and w.entries == 100
        later = w.append_nowait(entry(100))
        assert later is not futs[0]  # the next flush's entries get the next future
        await later
        await w.close()

    asyncio.run(main())


def test_get_during_compaction_never_reads_a_closed_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compaction rewrites the file on a worker thread while the actor's chat calls go on
    calling get() on the loop. The old code closed the old descriptor on that thread and
    only then swapped the new one in: a get() in between failed with EBADF inside a chat
    call. ``os.replace`` and ``os.close`` are wrapped to hold a worker thread right after
    each call, and a get() runs in every such window (with the fix: after the new file
    replaced the old one; the old code also stopped after closing the old descriptor)."""
    held: queue.Queue[str] = queue.Queue()
    go: queue.Queue[None] = queue.Queue()

    def holding(name: str, real: Any) -> Any:
        def call(*args: Any) -> Any:
            out = real(*args)
            if threading.current_thread() is not threading.main_thread():
                held.put(name)
                go.get(timeout=30)
            return out

        return call

    async def main() -> list[str]:
        w = JournalWriter(tmp_path / "w.jnl", fsync=False)
        await asyncio.gather(*(w.append(entry(i, task=f"t{i % 2}")) for i in range(20)))
        monkeypatch.setattr(os, "replace", holding("replace", os.replace))
        monkeypatch.setattr(os, "close", holding("close", os.close))
        compaction = asyncio.ensure_future(w.compact({"t0"}))
        windows = []
        async with asyncio.timeout(60):
            while not compaction.done():
                try:
                    windows.append(held.get_nowait())
                except queue.Empty:
                    await asyncio.sleep(0.01)
                    continue
                try:
                    got = w.get("d00001")  # a kept entry: from the old file or the new, never EBADF
                    assert got is not None and got.payload["n"] == 1
                finally:
                    go.put(None)
            assert await compaction == 10
        monkeypatch.undo()
        assert w.get("d00001").payload["n"] == 1 and w.get("d00000") is None  # type: ignore[union-attr]
        await w.close()
        return windows

    assert asyncio.run(main()) == ["replace"]  # the one window the worker thread still has


def _frame(body: bytes) -> bytes:
    """A frame with a valid header and crc around any body (what a bit flip that kept the crc, or another program, leaves)."""
    return struct.pack("<2sII", b"MJ", len(body), zlib.crc32(body)) + body


def test_index_and_compaction_skip_a_corrupt_frame_and_report_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Whole frames whose body is not an entry (not JSON, not UTF-8, no digest) are skipped
    and reported by every reader (the index an actor builds at start, life-start compaction,
    a writer's own compaction), not raised: they used to stop the actor's start or the life."""
    good = [encode(entry(i, task=f"t{i % 2}")) for i in range(4)]
    data = good[0] + _frame(b'{"not": "an entry"}') + good[1] + _frame(b"\xff\xfe not json") + good[2] + _frame(b"[1, 2]") + good[3] + b"MJ\x05"
    path = tmp_path / "r1-a.jnl"
    path.write_bytes(data)
    caplog.set_level(logging.WARNING, logger="matrix_hpc.store.journal")

    assert [e.digest for _, _, e in read_entries(path)] == [f"d{i:05d}" for i in range(4)]
    index = JournalIndex(tmp_path)
    assert len(index) == 4 and all(index.get(f"d{i:05d}").payload["n"] == i for i in range(4))  # type: ignore[union-attr]
    index.close()
    assert "r1-a.jnl" in caplog.text and "not a journal entry" in caplog.text and f"byte {len(good[0])}" in caplog.text

    async def own_compaction() -> None:
        w = JournalWriter(tmp_path / "own.jnl", fsync=False)
        (tmp_path / "own.jnl").write_bytes(data)  # its own file, corrupt frames included
        await w.append(entry(100, task="t0"))
        await w.compact({"t0"})
        await w.close()

    asyncio.run(own_compaction())
    assert [e.digest for _, _, e in read_entries(tmp_path / "own.jnl")] == ["d00001", "d00003"]
    (tmp_path / "own.jnl").unlink()

    kept, _ = compact_journal(tmp_path, lambda t: True, "base-r2.jnl")
    assert kept == 4 and [e.digest for _, _, e in read_entries(tmp_path / "base-r2.jnl")] == [f"d{i:05d}" for i in range(4)]


def test_an_entry_too_large_to_read_back_is_not_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Readers take a frame longer than the entry limit for garbage and stop there: writing
    one would hide every later entry of the file. It is left out (its call is not replayed)."""
    from matrix_hpc.store import journal

    monkeypatch.setattr(journal, "_MAX_ENTRY", 4096)

    async def main() -> None:
        w = JournalWriter(tmp_path / "big.jnl", fsync=False)
        await w.append(entry(0))
        await w.append(entry(1, size=8192))  # over the limit
        await w.append(entry(2))
        assert w.get("d00001") is None and w.get("d00002") is not None
        await w.close()

    asyncio.run(main())
    assert [e.digest for _, _, e in read_entries(tmp_path / "big.jnl")] == ["d00000", "d00002"]
