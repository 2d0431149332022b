"""The suite's own scheduling rule: ``make test`` keeps every Slurm and vLLM test on one
xdist worker by its node id (conftest ``is_heavy``); a marked test outside those names would
share the test Slurm cluster, or a vLLM start-up, with the other worker."""

from __future__ import annotations

import pytest

from .conftest import is_heavy


def test_heavy_tests_are_named_by_file(request: pytest.FixtureRequest) -> None:
    items = request.session.items
    marked = [i.nodeid for i in items if i.get_closest_marker("slurm") or i.get_closest_marker("vllm")]
    missed = [n for n in marked if not is_heavy(n)]
    assert not missed, f"marked slurm/vllm but scheduled beside the other worker's tests: {missed}"
    # and the rule names nothing else heavy by mistake
    wrong = [i.nodeid for i in items if is_heavy(i.nodeid) and i.nodeid not in marked]
    assert not wrong, wrong
