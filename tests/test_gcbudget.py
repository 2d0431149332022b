"""Full garbage collections are paced to a share of the time, whatever the heap size."""

from __future__ import annotations

import gc

from matrix_hpc.runtime.gcbudget import GcBudget


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_full_collections_take_at_most_their_share_of_the_time() -> None:
    clock = FakeClock()
    pass_s = 2.0  # a full pass over a big heap

    def collect(gen: int) -> int:
        assert gen == 2
        clock.now += pass_s
        return 0

    budget = GcBudget(share=0.05, min_interval_s=1.0, max_interval_s=600.0, clock=clock, collect=collect)
    while clock.now < 3600.0:  # an hour, checked twice a second
        budget.tick()
        clock.now += 0.5
    assert budget.collections > 0
    assert budget.spent_s / clock.now <= 0.05 + 1e-9, (budget.collections, budget.spent_s)
    # CPython's own rule would have run one every few seconds here; this runs one per ~40 s.
    assert budget.collections <= 3600 * 0.05 / pass_s + 1


def test_a_cheap_pass_runs_often_and_install_turns_automatic_full_passes_off() -> None:
    clock = FakeClock()
    budget = GcBudget(share=0.05, min_interval_s=1.0, clock=clock, collect=lambda gen: 0)
    runs = 0
    for _ in range(100):
        clock.now += 0.5
        runs += budget.tick()
    assert runs >= 45  # a pass that costs nothing is not postponed past min_interval_s
    before = gc.get_threshold()
    budget.install()
    try:
        assert gc.get_threshold()[2] >= 2**31 - 1 and gc.get_threshold()[0] == budget.young_threshold
    finally:
        budget.uninstall()
    assert gc.get_threshold() == before
