"""The progress line: LLM movement of tasks in flight (calls/s, tokens/s, per role) beside finished tasks."""

from __future__ import annotations

from matrix_hpc.progress import LLMRate, format_progress
from matrix_hpc.runtime.runner import RunProgress


def test_llm_rate_is_over_the_last_window_per_role() -> None:
    rate = LLMRate(window_s=10.0)
    assert rate.update(0.0, {}) == {}
    assert rate.update(5.0, {"teacher": (10, 1000)}) == {"teacher": (2.0, 200.0)}
    # Past the window, the oldest samples drop out: the rate is the recent one, not the run's average.
    rate.update(10.0, {"teacher": (20, 2000), "student": (5, 50)})
    got = rate.update(20.0, {"teacher": (20, 2000), "student": (15, 150)})
    assert got == {"teacher": (0.0, 0.0), "student": (1.0, 10.0)}


def test_a_run_with_no_task_finished_shows_its_calls_moving() -> None:
    p = RunProgress(total=50, in_flight=16)
    p.started_at, p.ended_at = 0.0, 100.0
    p.llm_by_role = {"critic": (40, 4000), "writer": (60, 12000)}
    line = format_progress(p, {"critic": (0.5, 50.0), "writer": (1.0, 200.0)})
    assert line == "done 0/50 | failed 0 | in flight 16 | 0.00 tasks/s | LLM 1.5 calls/s 250 tok/s (critic 0.5/s 50 tok/s, writer 1.0/s 200 tok/s)"
    # Without a recent window (the final line), the averages since the start; one role: no breakdown.
    p.llm_by_role = {"writer": (60, 12000)}
    assert format_progress(p).endswith("| LLM 0.6 calls/s 120 tok/s")
