"""Store write throughput: matrix-hpc's whole-chunk commits vs naive per-record zarr writes.

    python -m benchmarks.store_write [--records 5000] [--repeats 3]

Prints records/s (median of repeats) and the ratio to the baseline measured in the
same process: writing each finished record into its zarr row as it arrives, which
re-encodes the whole chunk per record (DESIGN.md measured ~180 rows/s).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr

from matrix_hpc.store import RecordRow, StoreReader, StoreWriter

RECORD_BYTES = 2000


def make_rows(n: int) -> list[RecordRow]:
    pad = "x" * RECORD_BYTES
    return [RecordRow.from_record({"id": f"t{i:07d}", "status": "ok", "result": {"text": pad}}) for i in range(n)]


def naive_per_record(rows: list[RecordRow], root: Path) -> None:
    arr = zarr.create_array(str(root / "naive.zarr"), shape=(len(rows),), chunks=(256,), dtype=str)
    for i, r in enumerate(rows):
        arr[i] = r.record


def store_commits(batch: int, fsync: bool) -> Callable[[list[RecordRow], Path], None]:
    def write(rows: list[RecordRow], root: Path) -> None:
        w = StoreWriter(root / "store", chunk_rows=256, fsync=fsync)
        for lo in range(0, len(rows), batch):
            w.append(rows[lo : lo + batch])
            w.commit()
        w.close()
        assert len(StoreReader(root / "store")) == len(rows)

    return write


def measure(fn: Callable[[list[RecordRow], Path], None], rows: list[RecordRow], repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            fn(rows, Path(tmp))
            rates.append(len(rows) / (time.perf_counter() - t))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=5000)
    ap.add_argument("--baseline-records", type=int, default=600, help="the naive baseline is slow; it writes fewer")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = make_rows(args.records)
    base = measure(naive_per_record, rows[: args.baseline_records], args.repeats)
    cases = [
        ("naive: one zarr write per record (baseline)", None),
        ("store: commit every 32 records, fsync", store_commits(32, True)),
        ("store: commit every 256 records (1 chunk), fsync", store_commits(256, True)),
        ("store: commit every 256 records, no fsync", store_commits(256, False)),
        ("store: commit every 1024 records, fsync", store_commits(1024, True)),
    ]
    print(f"{'writer':52} {'records/s':>10} {'x baseline':>11}")
    for name, fn in cases:
        rate = base if fn is None else measure(fn, rows, args.repeats)
        print(f"{name:52} {rate:10.0f} {rate / base:10.1f}x")
    print(
        f"({args.records} records of ~{RECORD_BYTES} B, baseline on {args.baseline_records}; medians of {args.repeats}; numpy {np.__version__}, zarr {zarr.__version__})"
    )


if __name__ == "__main__":
    main()
