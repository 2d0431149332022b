"""The driver's memory per row is bounded: no Python object per row of a large dataset
(issue 24: a hundred million rows). Counted with tracemalloc, which sees numpy's arrays
as well as Python objects; no timing is asserted."""

from __future__ import annotations

import itertools
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from matrix_hpc.runtime.source import SourceOptions, iter_tasks, scan_dataset
from matrix_hpc.store.idhash import IdHashes
from matrix_hpc.store.latest import resume_state

ROWS = 1_000_000


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A million rows in two Parquet shards (a second or two to write)."""
    root = tmp_path_factory.mktemp("big") / "data"
    root.mkdir()
    half = ROWS // 2
    for s in range(2):
        idx = pa.array(range(s * half, (s + 1) * half), pa.int64())
        ids = pc.binary_join_element_wise("q", pc.cast(idx, pa.string()), "")
        pq.write_table(pa.table({"id": ids, "question": pc.binary_join_element_wise("question ", pc.cast(idx, pa.string()), "")}), root / f"train-{s}.parquet")
    return root


def traced() -> int:
    return tracemalloc.get_traced_memory()[0]


def test_the_scan_keeps_8_bytes_a_row_and_streaming_holds_nothing_per_row(big: Path) -> None:
    opts = SourceOptions(path=big, entry_role="a")
    tracemalloc.start()
    try:
        before = traced()
        scan = scan_dataset(opts, ids=True)
        kept = traced() - before
        peak = tracemalloc.get_traced_memory()[1] - before
        assert scan.rows == ROWS and scan.ids is not None and scan.ids.hashes.nbytes == 8 * ROWS and not scan.ids.repeated
        assert kept < 8 * ROWS + (1 << 20), kept  # the hashes, and nothing per row beside them
        assert peak < 18 * ROWS, peak  # at the peak: the hashes, their sorted copy, a flag a row
        # Streaming: the memory at row 5,000 and at row 25,000 is the same (within a batch's
        # churn): the source keeps no id per row (the old id table grew 32-64 bytes a row).
        tasks = iter_tasks(opts, scan=scan)
        list(itertools.islice(tasks, 5_000))
        at_5k = traced()
        list(itertools.islice(tasks, 20_000))
        at_25k = traced()
        assert at_25k - at_5k < 256 * 1024, at_25k - at_5k
    finally:
        tracemalloc.stop()


def test_the_resume_state_keeps_8_bytes_an_id() -> None:
    """250,000 ids in the store: the ids a re-run skips are 2 MB of hashes, not ~25 MB of
    strings in a set; the few a hash cannot decide (``#dup@`` ids) are kept as text."""
    n = 250_000

    class Part:  # one committed part's columns, as the store reads them a slice at a time
        rows = n
        replaces = np.full(n, -1, np.int64)

        def read(self, lo: int, hi: int) -> tuple[list[str], list[str], list[str]]:
            ids = [f"q{i}" for i in range(lo, hi)]
            ids[0] = f"{ids[0]}#dup@row1"
            return ids, ["ok"] * (hi - lo), [""] * (hi - lo)

    resume_state([Part()], None)  # once before: the modules numpy imports on first use are not the state
    tracemalloc.start()
    try:
        before = traced()
        state = resume_state([Part()], None)
        kept = traced() - before
    finally:
        tracemalloc.stop()
    assert isinstance(state.skip, IdHashes) and len(state.skip) == n and state.skip.nbytes() == 8 * n
    assert kept < 8 * n + (1 << 19), kept
    assert "q5" in state.skip and "q0#dup@row1" in state.skip and "q0" not in state.skip and f"q{n}" not in state.skip
