"""Rank 0's lifeline (``matrix_hpc/cluster/slurm/lifeline.py``) with real sockets and a real
driver process: the end of a run reaches every rank, a SIGKILLed driver is seen as dead.

The Slurm tests (``tests/test_slurm_driver_death.py``) run the same on the test cluster."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest

from matrix_hpc.cluster.slurm.lifeline import DriverLink, Lifeline

DRIVER = """
import sys, time
from matrix_hpc.cluster.slurm.lifeline import Lifeline
line = Lifeline("127.0.0.1")
print(line.address, line.token, flush=True)
time.sleep(600)
"""


def _poll_until(link: DriverLink, want: str, timeout: float = 30) -> list[str]:
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = link.poll()
        seen.append(state)
        if state == want:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"no {want!r} in {timeout:.0f}s: {seen[-5:]}")


def test_end_reaches_every_rank_and_waits_for_their_acks() -> None:
    line = Lifeline("127.0.0.1")
    a, b = DriverLink(line.address, line.token, 1), DriverLink(line.address, line.token, 2)
    assert a.poll() == "running" and b.poll() == "running"
    acks: list[list[int]] = []
    ender = threading.Thread(target=lambda: acks.append(line.end(timeout_s=30)))
    ender.start()
    _poll_until(a, "done")
    time.sleep(0.3)
    assert ender.is_alive()  # rank 2 has not acknowledged yet: rank 0 keeps its head up
    _poll_until(b, "done")
    ender.join(30)
    assert acks == [[]]


def test_a_rank_that_never_acknowledges_is_waited_for_only_as_long_as_the_bound() -> None:
    line = Lifeline("127.0.0.1")
    a = DriverLink(line.address, line.token, 1)
    t0 = time.monotonic()
    missing = line.end(timeout_s=1.0)
    assert missing == [1] and time.monotonic() - t0 < 20
    assert a.poll() == "done"  # told even though rank 0 stopped waiting
    with pytest.raises(ConnectionRefusedError):  # a rank that comes after the end: it never saw a driver
        DriverLink(line.address, line.token, 2)


def test_sigkilled_driver_is_dead_to_its_links_at_once() -> None:
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        address, token = proc.stdout.readline().split()  # type: ignore[union-attr]
        link = DriverLink(address, token, 1)
        assert link.poll() == "running"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        seen = _poll_until(link, "dead", timeout=10)
        assert "done" not in seen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_broken_connection_to_a_live_driver_is_taken_again_not_called_a_death() -> None:
    line = Lifeline("127.0.0.1")
    link = DriverLink(line.address, line.token, 1)
    first = line._peers[1]
    first.close()  # the connection breaks (rank 0's side); the driver lives on
    seen = []
    deadline = time.monotonic() + 30
    while line._peers.get(1) is first and time.monotonic() < deadline:
        seen.append(link.poll())
        time.sleep(0.05)
    assert line._peers.get(1) is not first, seen  # the link connected again
    assert "dead" not in seen and link.poll() == "running"
    acks: list[list[int]] = []
    ender = threading.Thread(target=lambda: acks.append(line.end(timeout_s=30)))
    ender.start()
    _poll_until(link, "done")  # the new connection is told the end
    ender.join(30)
    assert acks == [[]]


def test_a_hello_without_the_token_is_dropped_and_the_rank_keeps_its_place() -> None:
    line = Lifeline("127.0.0.1")
    link = DriverLink(line.address, line.token, 1)
    with pytest.raises(ConnectionRefusedError):  # closed before any ok: not taken for rank 1
        DriverLink(line.address, "not-the-token", 1)
    assert link.poll() == "running"
    acks: list[list[int]] = []
    ender = threading.Thread(target=lambda: acks.append(line.end(timeout_s=30)))
    ender.start()
    _poll_until(link, "done")
    ender.join(30)
    assert acks == [[]]
