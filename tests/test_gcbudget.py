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


def test_install_freezes_what_start_up_left_so_full_passes_skip_it() -> None:
    # An idle actor's heap is almost all start-up's (Ray's, zarr's, the agent's modules):
    # without freezing it, every paced full pass walked ~80,000 objects, 3% of a core.
    budget = GcBudget(collect=gc.collect)
    start_up = [[i] for i in range(50_000)]  # tracked containers, alive before install
    gc.collect()
    assert len(gc.get_objects(generation=2)) >= 50_000
    budget.install()
    try:
        assert gc.get_freeze_count() >= 50_000
        walked = len(gc.get_objects(generation=2))  # what a full pass walks now
        assert walked < 10_000, walked
        later = [[i] for i in range(1_000)]  # the run's own objects are still collected
        gc.collect()
        assert len(gc.get_objects(generation=2)) >= len(later)
    finally:
        budget.uninstall()
    assert gc.get_freeze_count() == 0
    del start_up
