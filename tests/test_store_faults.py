"""Store faults (issue 11): a closed writer never writes, a torn resize is repaired,
and the "previous writer alive?" check reads the writer's lease, whatever its host."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from matrix_hpc.runtime.sink import _TRIM_AT, _IdLog
from matrix_hpc.store import RecordRow, StoreError, StoreLockedError, StoreReader, StoreWriter
from matrix_hpc.store.fsutil import WriterLease
from matrix_hpc.store.writer_check import wait_for_previous_writer


def rows(lo: int, hi: int) -> list[RecordRow]:
    return [RecordRow(f"r{i}", "ok", "", f'{{"id": "r{i}"}}', float(i), 1, 2) for i in range(lo, hi)]


def test_closed_writer_refuses_to_write(tmp_path: Path) -> None:
    w = StoreWriter(tmp_path, chunk_rows=4)
    w.append(rows(0, 3))
    w.close()
    assert w.append(rows(3, 5)) == []
    with pytest.raises(StoreError, match="released its lock"):
        w.commit()
    assert len(StoreReader(tmp_path)) == 3
    lease = WriterLease.read(w.lease_path)
    assert lease is not None and lease.released and not lease.live()


def test_torn_multi_array_resize_is_repaired_on_open(tmp_path: Path) -> None:
    w = StoreWriter(tmp_path, chunk_rows=4)
    w.append(rows(0, 6))
    w.commit()
    cap = w._arrays["id"].shape[0]
    # A writer killed inside the resize of the arrays: only the first ones grew.
    for name in ("id", "status"):
        w._arrays[name].resize((cap * 2,))
    w._lock.release()
    w2 = StoreWriter(tmp_path, chunk_rows=4)
    assert {arr.shape[0] for arr in w2._arrays.values()} == {cap * 2}
    w2.append(rows(6, cap + 10))  # past the old capacity of the short arrays
    w2.close()
    assert [r["id"] for r in StoreReader(tmp_path).iter_records()] == [f"r{i}" for i in range(cap + 10)]


def test_failed_commit_json_write_then_retry_writes_each_row_once(tmp_path: Path) -> None:
    """The sink retries a commit whose commit.json could not be written (ENOSPC, EIO): the
    retry must rewrite the same rows at the same place, not append them again."""
    w = StoreWriter(tmp_path, chunk_rows=4)
    w.append(rows(0, 3))
    w.commit()
    blocker = w.dir / f".commit.json.{os.getpid()}.tmp"
    blocker.mkdir()  # the temp file cannot be created: commit.json's write fails
    batch = rows(3, 6)
    w.append(batch)
    pending = w.take_pending()
    with pytest.raises(OSError):
        w.write(pending)
    blocker.rmdir()
    w.write(pending)  # the sink's retry, with the same rows
    w.close()
    assert [r["id"] for r in StoreReader(tmp_path).iter_records()] == [f"r{i}" for i in range(6)]
    StoreWriter(tmp_path, chunk_rows=4).close()  # and the part opens again


def _lease(part: Path, host: str, renewed_ago: float, lease_s: float, **kw: object) -> WriterLease:
    now = time.time() - renewed_ago
    lease = WriterLease(
        host=host,
        pid=4242,
        run_id="r1",
        driver_host=str(kw.get("driver_host", "node-a")),
        driver_pid=int(kw.get("driver_pid", 77)),
        renewed_at=now,
        expires_at=now + lease_s,
    )
    part.mkdir(parents=True, exist_ok=True)
    lease.write(WriterLease.path_for(part / "writer.lock"))
    return lease


def test_live_writer_on_another_host_is_refused_by_its_lease(tmp_path: Path) -> None:
    # flock is not shared between the hosts here: only the lease says the sink on node-b lives.
    part = tmp_path / "part-000"
    lease = _lease(part, "node-b", 0, 1.0)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(0.2):
            lease.renew(WriterLease.path_for(part / "writer.lock"), 1.0)

    t = threading.Thread(target=renew)
    t.start()
    try:
        with pytest.raises(StoreLockedError, match="sink pid 4242 on node-b, run r1"):
            wait_for_previous_writer(part, lambda _m: None, timeout_s=10, lease_s=1.0)
    finally:
        stop.set()
        t.join()


def test_writer_that_stops_renewing_is_waited_out(tmp_path: Path) -> None:
    part = tmp_path / "part-000"
    _lease(part, "node-b", 0, 1.0)  # written, never renewed: its sink died with its driver
    said: list[str] = []
    started = time.monotonic()
    wait_for_previous_writer(part, said.append, timeout_s=10, lease_s=1.0)
    assert 0.5 < time.monotonic() - started < 5
    assert said and "node-b" in said[0]


def test_live_driver_on_this_host_is_refused_at_once(tmp_path: Path) -> None:
    import socket

    part = tmp_path / "part-000"
    _lease(part, "node-b", 0, 30.0, driver_host=socket.gethostname(), driver_pid=os.getpid())
    with pytest.raises(StoreLockedError, match="being written by another run"):
        wait_for_previous_writer(part, lambda _m: None, timeout_s=1)


def test_lock_held_on_this_host_by_a_crashed_runs_writer_is_waited_for(tmp_path: Path) -> None:
    """The sink of a SIGKILLed driver lives a moment longer; the check waits for it."""
    import socket

    part = tmp_path / "part-000"
    part.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl,os,sys,time; fd=os.open(sys.argv[1], os.O_RDWR|os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(1.5)", str(part / "writer.lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    lease = _lease(part, socket.gethostname(), 0, 30.0, driver_host=socket.gethostname(), driver_pid=int(dead))
    lease.pid = holder.pid  # the sink: it holds the lock, and its lease is not released when it is killed
    lease.write(WriterLease.path_for(part / "writer.lock"))
    threading.Thread(target=holder.wait, daemon=True).start()  # reap it: a zombie's pid still exists
    said: list[str] = []
    wait_for_previous_writer(part, said.append, timeout_s=20)
    assert holder.wait(5) == 0 and said and "crashed run" in said[0]


def test_sink_id_logs_forget_what_the_driver_has_read() -> None:
    log = _IdLog()
    log.extend(f"i{k}" for k in range(3 * _TRIM_AT))
    assert log.since(0)[:1] == ["i0"]
    assert log.since(2 * _TRIM_AT)[:1] == [f"i{2 * _TRIM_AT}"]
    assert len(log._ids) == _TRIM_AT and log.end == 3 * _TRIM_AT  # the read prefix is gone
    assert log.since(3 * _TRIM_AT) == []


def test_summary_adds_only_new_rows_to_the_previous_totals(tmp_path: Path) -> None:
    import json as _json

    from matrix_hpc.runtime.usage import UsageSummary
    from matrix_hpc.summary import summarize

    def recs(lo: int, hi: int) -> list[RecordRow]:
        out = []
        for i in range(lo, hi):
            rec = {"id": f"r{i}", "status": "failed" if i % 3 == 0 else "ok", "error": {"kind": "x"} if i % 3 == 0 else None,
                   "usage": {"prompt_tokens": i, "completion_tokens": 1, "by_role": {"a": {"prompt_tokens": i, "completion_tokens": 1, "calls": 1}}, "by_model": {}}}  # fmt: skip
            out.append(RecordRow.from_record(rec))
        return out

    w = StoreWriter(tmp_path, chunk_rows=8)
    w.append(recs(0, 20))
    w.commit()
    first = summarize(tmp_path, None, {}, UsageSummary(), None)
    w.append(recs(20, 50))
    w.commit()
    w.close()
    # The next life starts from the first's totals; a store reader that read anything
    # before the marks would count rows 0-19 twice.
    seen: list[str] = []
    second = summarize(tmp_path, first.upto, first.store, first.usage, lambda rs: {"n": len([seen.append(r["id"]) for r in rs])})
    full = summarize(tmp_path, None, {}, UsageSummary(), None)
    assert second.store == full.store and second.store["records"] == 50 and second.store["failed_by_kind"] == {"x": 17}
    assert second.usage == full.usage and second.usage.by_role["a"].prompt_tokens == sum(range(50))
    assert second.metrics == {"n": 50} and seen == [f"r{i}" for i in range(50)]  # metrics: the whole store, each record once
    assert _json.dumps(second.upto) == '{"part-000": 50}'


_KILL_IN_RESIZE = """
import os, signal, sys
import zarr
from matrix_hpc.store import RecordRow, StoreWriter
rows = lambda lo, hi: [RecordRow(f"r{i}", "ok", "", '{"id": "r%d"}' % i, float(i), 1, 2) for i in range(lo, hi)]
w = StoreWriter(sys.argv[1], chunk_rows=4)
w.append(rows(0, 6)); w.commit()
calls = [0]
real = zarr.Array.resize
def resize(self, shape):
    real(self, shape)
    calls[0] += 1
    if calls[0] == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)  # a kill inside the multi-array resize
zarr.Array.resize = resize
w.append(rows(6, 200)); w.commit()
"""


@pytest.mark.parametrize("after", [1, 3, 6])
def test_writer_killed_inside_the_resize_loses_nothing_committed(tmp_path: Path, after: int) -> None:
    res = subprocess.run([sys.executable, "-c", _KILL_IN_RESIZE, str(tmp_path), str(after)], capture_output=True, text=True)
    assert res.returncode == -9, res.stderr
    assert [r["id"] for r in StoreReader(tmp_path).iter_records()] == [f"r{i}" for i in range(6)]
    w = StoreWriter(tmp_path, chunk_rows=4)  # repairs the torn resize
    w.append(rows(6, 200))
    w.close()
    assert [r["id"] for r in StoreReader(tmp_path).iter_records()] == [f"r{i}" for i in range(200)]
