"""Driver start-up and source memory over a large sharded Parquet dataset (issue 24).

    python -m benchmarks.dataset_scale [--rows 1000000 10000000] [--shards 16] [--stream 2000000]

For each size it writes a sharded Parquet dataset (``data/train-0000i-of-0000N.parquet``:
an ``id``, a ``question`` of ~60 bytes and a ``blob`` column of ~200 bytes the source must
not hold) and measures, each in a fresh process (peak RSS is its ``VmHWM``; the table
also gives it less the process's RSS once Python, pyarrow and the source are imported):

* ``scan``: the driver's start-up pass (:func:`scan_dataset`: resolve the shards, count
  the rows, read the id column once);
* ``stream``: :func:`iter_tasks` over the first ``--stream`` rows (all rows when fewer),
  with ``dataset.columns`` keeping ``id`` and ``question`` (``blob`` never read), and the
  same with every column. The source holds one batch of rows at a time; what grows is the
  map of the ids seen so far (duplicate detection and resume need it), so the table also
  prints the RSS per million rows streamed.

Measured on the 2-core test machine (busy; times are loose), 16 shards:

       rows shards  on disk |  scan s  scan MB |  streamed  cols s  cols MB   all s  all MB MB/M rows
  1,000,000     16     12MB |    0.12      +38 | 1,000,000    67.2     +131    33.4    +162       131
 10,000,000     16    118MB |    0.74      +50 | 2,000,000    60.0     +251   132.9    +249       125

Start-up (the scan) stays under a second and ~50 MB at 10M rows: it reads Parquet footers
and the id column only. Streaming holds one row group's batches (~70 MB, flat in the row
count); the rest is the id table (16 bytes a slot, at most half full) and its doubling.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, sys, time
from pathlib import Path
from matrix_hpc.runtime.source import SourceOptions, columns_option, iter_tasks, scan_dataset
import pyarrow.parquet
def hwm():  # this process's peak RSS in MB (VmHWM: unlike ru_maxrss, not inherited across exec)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
path, mode, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
base = hwm()
cols = columns_option(["id", "question"]) if mode == "stream-cols" else None
opts = SourceOptions(path=Path(path), entry_role="a", columns=cols, limit=limit or None)
t0 = time.perf_counter()
if mode == "scan":
    n = scan_dataset(opts).rows
else:
    n = 0
    for _ in iter_tasks(opts):
        n += 1
dt = time.perf_counter() - t0
print(json.dumps({"rows": n, "s": dt, "peak_mb": hwm(), "base_mb": base}))
"""


def make_dataset(root: Path, rows: int, shards: int) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    data = root / "data"
    data.mkdir(parents=True)
    per = -(-rows // shards)
    for s in range(shards):
        lo, hi = s * per, min(rows, (s + 1) * per)
        idx = pa.array(range(lo, hi), pa.int64())
        ids = pc.binary_join_element_wise("q", pc.cast(idx, pa.string()), "")
        question = pc.binary_join_element_wise("what is the answer to question number ", pc.cast(idx, pa.string()), " ?", "")
        blob = pc.binary_repeat(pa.array(["x"], pa.string()), 200).take(pa.array([0] * (hi - lo)))
        table = pa.table({"id": ids, "question": question, "blob": blob})
        pq.write_table(table, data / f"train-{s:05d}-of-{shards:05d}.parquet", row_group_size=65536)


def measure(path: Path, mode: str, limit: int) -> dict:
    res = subprocess.run([sys.executable, "-c", _CHILD, str(path), mode, str(limit)], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--stream", type=int, default=2_000_000, help="rows iter_tasks streams (0: all)")
    ap.add_argument("--dir", default=None, help="where to write the datasets (default: a temporary folder)")
    args = ap.parse_args()
    tmp = Path(args.dir or tempfile.mkdtemp(prefix="dataset_scale-"))
    print(
        f"{'rows':>11} {'shards':>6} {'on disk':>8} | {'scan s':>7} {'scan MB':>8} | {'streamed':>9} {'cols s':>7} {'cols MB':>8} {'all s':>7} {'all MB':>7} {'MB/M rows':>9}"
    )
    try:
        for rows in args.rows:
            root = tmp / f"r{rows}"
            if not root.exists():
                make_dataset(root, rows, args.shards)
            size_mb = sum(p.stat().st_size for p in root.rglob("*.parquet")) / 2**20
            scan = measure(root, "scan", 0)
            assert scan["rows"] == rows, scan
            limit = min(rows, args.stream) if args.stream else rows
            cols = measure(root, "stream-cols", limit)
            full = measure(root, "stream", limit)
            per_m = (cols["peak_mb"] - cols["base_mb"]) / (limit / 1e6)
            print(
                f"{rows:>11,} {args.shards:>6} {size_mb:>6.0f}MB | {scan['s']:>7.2f} {scan['peak_mb'] - scan['base_mb']:>+8.0f} | "
                f"{limit:>9,} {cols['s']:>7.1f} {cols['peak_mb'] - cols['base_mb']:>+8.0f} {full['s']:>7.1f} {full['peak_mb'] - full['base_mb']:>+7.0f} {per_m:>9.0f}",
                flush=True,
            )
    finally:
        if args.dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"MB columns: peak RSS above a fresh process's with Python, pyarrow and the source imported (~{scan['base_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
