"""The outbox's adaptive window: messages leave at once when few tasks are in flight,
and gather into bigger batches (fewer Ray calls per hop) when many are."""

from __future__ import annotations

import time

from matrix_hpc.runtime.outbox import PARKED_SHARE, Outbox


def _outbox(held: int, wait_s: float = 0.1) -> Outbox:
    return Outbox(lambda dest: [], batch_size=64, wait_s=wait_s, load=lambda: held, min_wait_s=0.001)


def _at_rate(box: Outbox, per_s: float, seconds: float = 3.0) -> float:
    """The window after ``seconds`` of messages at ``per_s`` (simulated clock, no Ray)."""
    box._rate_at = time.monotonic() - seconds
    box._puts = int(per_s * seconds)
    box._rate = per_s  # as if it had been flowing before too
    return box.window()


def test_window_keeps_parked_tasks_a_small_share_of_those_held() -> None:
    # 1,000 tasks held, 200 messages/s: 100 ms parks ~10 tasks (1%): the longest window.
    assert abs(_at_rate(_outbox(1000), 200) - 0.1) < 1e-9
    # 50 tasks held, 200 messages/s: the window shrinks to park 5% of them.
    w = _at_rate(_outbox(50), 200)
    assert abs(w - 2 * PARKED_SHARE * 50 / 200) < 0.002 and abs(200 * w / 2 - PARKED_SHARE * 50) < 0.2
    # 1 task held: no batching worth the latency; a first message ever leaves at once.
    assert _at_rate(_outbox(1), 400) == 0.001
    assert _outbox(1000).window() == 0.001


def test_without_a_load_signal_the_window_is_fixed() -> None:
    box = Outbox(lambda dest: [], batch_size=64, wait_s=0.02)
    assert box.window() == 0.02
