"""The dataset's order of a run's records, for ``matrix-hpc export --dataset-order``.

A record does not carry its row's position: the store holds records in the order their
tasks finished. The order is found again by reading the run's dataset (``run.json``'s
config) the way the run's source read it (:func:`~.runtime.source.iter_tasks`: the same
ids, content hashes and ``#dup@`` ids for repeated ones). The dataset must still be
there; a record whose id it no longer holds is written after the others, in store order.
It holds every id in memory (a dict, ~170 bytes a row).
"""

from __future__ import annotations

import logging
from pathlib import Path

from .store import StoreError, StoreReader

__all__ = ["dataset_positions"]

log = logging.getLogger(__name__)


def dataset_positions(output: str | Path) -> dict[str, int]:
    """Each task id of the run's dataset -> its row's position (0 for the first)."""
    from .config import JobConfig
    from .config.build import build
    from .job import _source_options
    from .runtime.source import iter_tasks

    config = StoreReader(output).run_info().get("config")
    if not config:
        raise StoreError(f"{output}: run.json holds no config, so the dataset order is not known (export without --dataset-order)")
    opts = _source_options(build(JobConfig, config, ""))
    positions: dict[str, int] = {}
    for i, task in enumerate(iter_tasks(opts)):
        positions.setdefault(task.id, i)
    log.info("dataset order: %d ids read from %s", len(positions), opts.path)
    return positions
