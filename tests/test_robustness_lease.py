"""The sink's writer lease is renewed while a commit is slow (issue 20, item 12).

Another host tells a live writer from a dead one only by its lease (``flock`` may not be
shared between hosts). Renewal used to run after each commit, in the sink's flush loop,
so a commit slower than the lease (15 s) let the lease expire under a live writer, and a
second host could open the store as a writer too.

The commit is made genuinely slow, with no hook: a FIFO sits where the sink writes its
``commit.json`` temp file, so the commit blocks in ``open()`` (the kernel's
``wait_for_partner``) until the test opens the FIFO's other end.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from matrix_hpc.store.fsutil import LEASE_S, WriterLease

from .conftest import REPO, committed_rows, wait_for
from .test_robustness_runtime import AGENTS, actor_pid, each_id_once, relay_config, started

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))


def _blocked_on_fifo(pid: int) -> bool:
    """A thread of ``pid`` waits in open() for the other end of a FIFO."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            if (task / "wchan").read_text().strip() == "wait_for_partner":
                return True
    return False


def _open_from_another_host(part: Path, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """What a run on host ``node-b`` does before it opens the store (its own UTS namespace:
    another host name, the same files)."""
    code = (
        "import sys; from pathlib import Path; from matrix_hpc.store.writer_check import wait_for_previous_writer\n"
        "try:\n"
        f"    wait_for_previous_writer(Path({str(part)!r}), print, timeout_s={timeout_s})\n"
        "except Exception as exc:\n"
        "    print(f'REFUSED: {exc}'); sys.exit(3)\n"
        "print('OPENED')\n"
    )
    return subprocess.run(
        ["unshare", "--uts", "sh", "-c", 'hostname node-b && exec "$0" -c "$1"', sys.executable, code],
        capture_output=True, text=True, timeout=timeout_s + 60, cwd=REPO,
    )  # fmt: skip


def test_lease_stays_live_while_a_commit_is_slower_than_the_lease(tmp_path: Path, run_factory: Any) -> None:
    if os.geteuid() != 0:
        pytest.skip("unshare --uts needs root")
    n = 120
    roles = {"a": {"agent": f"{AGENTS}:SetupFailsAfter", "concurrency": 4, "params": {"count": str(tmp_path / "setups"), "ok_setups": 99, "sleep_s": 0.3}}}
    out = tmp_path / "out"
    part = out / "part-000"
    run = run_factory(relay_config(tmp_path, n, roles, **{"output.fsync": True, "run.stall_timeout_s": 0}))
    wait_for(lambda: started(out, 8), 120, "first commits", run)
    sink = actor_pid(out, "/__sink__")
    fifo = part / f".commit.json.{sink}.tmp"
    os.mkfifo(fifo)
    try:
        wait_for(lambda: _blocked_on_fifo(sink), 60, "a commit blocked on the FIFO", run)
        blocked_at, rows = time.monotonic(), committed_rows(out)
        time.sleep(LEASE_S + 5)  # the commit now takes longer than the lease lasts
        assert _blocked_on_fifo(sink) and committed_rows(out) == rows, "the commit was not held"
        lease = WriterLease.read(WriterLease.path_for(part / "writer.lock"))
        assert lease is not None and lease.live(), f"the lease expired under a live writer {time.monotonic() - blocked_at:.0f}s into a slow commit: {lease}"
        other = _open_from_another_host(part, timeout_s=3 * LEASE_S)
        assert other.returncode == 3 and "REFUSED" in other.stdout and "lease renewed" in other.stdout, other.stdout + other.stderr
        assert _blocked_on_fifo(sink), "the commit ended before the second opener was refused"
    finally:  # let the commit go on (it fails once, fsync of a FIFO, and is retried)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISFIFO(os.lstat(fifo).st_mode):
                fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
                time.sleep(0.5)
                os.close(fd)
    assert run.wait(240) == 0, run.output  # the sink retries the commit and the run completes
    records = each_id_once(out, n)
    assert all(r["status"] == "ok" for r in records)
