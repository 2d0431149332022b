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

from .conftest import write_jsonl

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


def _tasks(opts: SourceOptions, **kw: object) -> list[tuple[str, str | None]]:
    return [(t.id, t.error.message if t.error else None) for t in iter_tasks(opts, **kw)]  # type: ignore[arg-type]


def test_ids_with_one_hash_are_told_apart_as_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every id given one of two hashes (collisions everywhere): the source finds the same
    repeated ids, and a resume skips the same rows, as with the real hash, because ids whose
    hash two rows share are compared as text: a collision never drops or skips a row."""
    import matrix_hpc.runtime.source as source
    import matrix_hpc.store.idhash as idhash

    lines = [{"id": i} for i in ["a", "b", "a", "a#dup@line3", "c", "b", "dd", "a#dup@line3"]] + ["{bad", {"q": 1}, {"q": 1}]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    opts = SourceOptions(path=path, entry_role="a")
    real = _tasks(opts)
    real_skip = _tasks(opts, done={"a", "dd", "a#dup@line3"})
    assert [m for _, m in real if m and "duplicate" in m] == [
        "line 3: duplicate id 'a' (first at line 1)",
        "line 4: duplicate id 'a#dup@line3' (first at line 3)",
        "line 6: duplicate id 'b' (first at line 2)",
        "line 8: duplicate id 'a#dup@line3' (first at line 3)",
        "line 11: duplicate id " + repr(real[9][0]) + " (first at line 10)",
    ]
    weak = lambda tid: 1 + len(tid) % 2  # noqa: E731
    monkeypatch.setattr(idhash, "id_hash", weak)
    monkeypatch.setattr(source, "id_hash", weak)
    scan = scan_dataset(opts, ids=True)
    assert scan.ids is not None and scan.ids.repeated == {2}  # "dd" alone has hash 1
    assert _tasks(opts, scan=scan) == real
    done = IdHashes.of(["a", "dd", "a#dup@line3"], exact_hashes=scan.ids.repeated)
    assert "b" not in done and "c" not in done and "a" in done
    assert _tasks(opts, done=done, scan=scan) == real_skip


def test_a_file_changed_after_the_scan_still_has_its_repeats_found(tmp_path: Path) -> None:
    """Rows the run reads otherwise than the scan did (a file rewritten in between, a row
    group readable only in part) are compared as text and against the scan's hashes."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "a"}, {"id": "b"}, {"id": "c"}, {"id": "d"}])
    opts = SourceOptions(path=path, entry_role="a")
    scan = scan_dataset(opts, ids=True)
    write_jsonl(path, [{"id": "a"}, {"id": "b"}, {"id": "a"}, {"id": "e"}, {"id": "e"}])
    assert _tasks(opts, scan=scan) == [
        ("a", None),
        ("b", None),
        ("a#dup@line3", "line 3: duplicate id 'a' (first at line 1)"),
        ("e", None),
        ("e#dup@line5", "line 5: duplicate id 'e' (first at line 4)"),
    ]
