"""Driver start-up and memory over a large sharded Parquet dataset (issue 24).

    python -m benchmarks.dataset_scale [--rows 1000000 10000000] [--shards 16] [--stream 1000000]

For each size it writes a sharded Parquet dataset (``data/train-0000i-of-0000N.parquet``:
an ``id``, a ``question`` of ~60 bytes and a ``blob`` column of ~200 bytes the source must
not hold) and measures, each in a fresh process (peak RSS is its ``VmHWM``, kept is
``VmRSS`` after; both less the process's RSS once Python, pyarrow and the source are
imported):

* ``scan``: the driver's start-up pass (``scan_dataset(opts, ids=True)``: resolve the
  shards, count the rows, read the id column once and keep every row's id as a 64-bit
  hash, 8 bytes a row; its peak adds a sorted copy and a flag a row to find repeated ids);
* ``resume``: the resume state of a store holding every id (``latest.resume_state``: the
  ids a re-run skips as sorted hashes, 8 bytes an id), the ids read as a store part reads
  them, 262,144 at a time;
* ``stream``: :func:`iter_tasks` over the first ``--stream`` rows with ``dataset.columns``
  keeping ``id`` and ``question`` (``blob`` never read). The source holds one batch of rows
  and no id per row: the RSS growth from a tenth (and from half) of the rows to the end,
  per million rows, is the allocator's noise (±5 MB).

Measured on the 2-core test machine (busy: other test suites ran at the same time; times
are loose), 16 shards, after issue 24's 8-bytes-a-row change:

       rows  on disk | scan s peak MB kept MB B/row | resume s peak MB kept MB |  streamed     s peak MB MB/M rows 2nd half
  1,000,000     12MB |    2.4     +45     +36    47 |      4.3     +21     +15 | 1,000,000    37     +63      -4.7      4.6
 10,000,000    118MB |   31.0    +198    +112    21 |     18.3    +149    +119 | 1,000,000    38     +77      -1.0     -3.7

(tracemalloc, which counts live objects and numpy arrays but not the allocator's slack:
the scan keeps 8.0 bytes a row, 17 at its peak; 10M ids' resume state keeps 76 MB;
tests/test_source_scale.py checks both.) A 2.25M-row stream's RSS stayed within
147-167 MB from row 250,000 to the end.

Before (the same benchmark at 0c11752: the ids seen kept in a hashed numpy table, 16 bytes
a slot at most half full, and the ids a resume skips in a Python set, ~90 bytes an id):

       rows shards  on disk |  scan s  scan MB |  streamed  cols s  cols MB   all s  all MB MB/M rows
  1,000,000     16     12MB |    0.12      +38 | 1,000,000    67.2     +131    33.4    +162       131
 10,000,000     16    118MB |    0.74      +50 | 2,000,000    60.0     +251   132.9    +249       125

A hundred million rows, extrapolated (not run: the dataset takes ~1.2 GB and the passes
~10 minutes on this machine): the scan keeps ~0.8 GB (peak ~1.7 GB, once) and takes ~5
minutes (~3 µs a row here: blake2b of each id; JSONL, or ids that need the row, parse every
line: ~5-10 µs); a resume state of 100M ids ~0.8 GB; streaming adds ~70 MB whatever the
count. The driver holds ~1.6 GB for the source and the resume state together, where it
held ~12.5 GB before (~125 MB a million rows streamed, and ~90 bytes an id to skip).
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
import numpy as np, pyarrow.parquet as pq
from matrix_hpc.runtime.source import SourceOptions, columns_option, iter_tasks, scan_dataset
from matrix_hpc.store.latest import resume_state
def rss(key="VmHWM"):  # MB: peak RSS (VmHWM: unlike ru_maxrss, not inherited across exec) or now (VmRSS)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) / 1024
path, mode, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
base = rss()
opts = SourceOptions(path=Path(path), entry_role="a", columns=columns_option(["id", "question"]), limit=limit or None)
t0 = time.perf_counter()
out = {}
if mode == "scan":  # the driver's start-up: rows, and every row's id hash
    scan = scan_dataset(opts, ids=True)
    n, out["kept_mb"] = scan.rows, rss("VmRSS") - base
elif mode == "resume":  # the resume state of a store holding every id (read as the store is: a million at a time)
    class Part:  # as the store's part reads its columns, a slice at a time
        def __init__(self, f):
            self.col = pq.read_table(f, columns=["id"]).column(0)
            self.rows = len(self.col)
            self.replaces = np.full(self.rows, -1, np.int64)
        def read(self, lo, hi):
            ids = self.col.slice(lo, hi - lo).to_pylist()
            return ids, ["ok"] * len(ids), [""] * len(ids)
    parts = [Part(f) for f in sorted(Path(path).rglob("*.parquet"))]
    base, t0 = rss("VmRSS"), time.perf_counter()  # the ids as the store holds them are not the resume state's
    state = resume_state(parts, None)
    n, out["kept_mb"] = len(state.skip), rss("VmRSS") - base
else:  # the source streaming its tasks: RSS at a tenth of the rows and at the end gives the slope
    scan = scan_dataset(opts, ids=True)
    t0 = time.perf_counter()
    n, tenth, half, at, mid = 0, max(1, scan.rows // 10), max(1, scan.rows // 2), None, None
    for _ in iter_tasks(opts, scan=scan):
        n += 1
        if n == tenth:
            at = rss("VmRSS")
        if n == half:
            mid = rss("VmRSS")
    end = rss("VmRSS")
    out["slope_mb_per_m"] = (end - at) / ((n - tenth) / 1e6)
    out["slope2_mb_per_m"] = (end - mid) / ((n - half) / 1e6)
out.update(rows=n, s=time.perf_counter() - t0, peak_mb=rss() - base, base_mb=base)
print(json.dumps(out))
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
    ap.add_argument("--stream", type=int, default=1_000_000, help="rows iter_tasks streams (0: all)")
    ap.add_argument("--dir", default=None, help="where to write the datasets (default: a temporary folder)")
    args = ap.parse_args()
    tmp = Path(args.dir or tempfile.mkdtemp(prefix="dataset_scale-"))
    print(
        f"{'rows':>11} {'on disk':>8} | {'scan s':>6} {'peak MB':>7} {'kept MB':>7} {'B/row':>5} | "
        f"{'resume s':>8} {'peak MB':>7} {'kept MB':>7} | {'streamed':>9} {'s':>5} {'peak MB':>7} {'MB/M rows':>9} {'2nd half':>8}"
    )
    try:
        for rows in args.rows:
            root = tmp / f"r{rows}"
            if not root.exists():
                make_dataset(root, rows, args.shards)
            size_mb = sum(p.stat().st_size for p in root.rglob("*.parquet")) / 2**20
            scan = measure(root, "scan", 0)
            assert scan["rows"] == rows, scan
            resume = measure(root, "resume", 0)
            assert resume["rows"] == rows, resume
            limit = min(rows, args.stream) if args.stream else rows
            stream = measure(root, "stream", limit)
            print(
                f"{rows:>11,} {size_mb:>6.0f}MB | {scan['s']:>6.1f} {scan['peak_mb']:>+7.0f} {scan['kept_mb']:>+7.0f} {scan['peak_mb'] * 2**20 / rows:>5.0f} | "
                f"{resume['s']:>8.1f} {resume['peak_mb']:>+7.0f} {resume['kept_mb']:>+7.0f} | "
                f"{limit:>9,} {stream['s']:>5.0f} {stream['peak_mb']:>+7.0f} {stream['slope_mb_per_m']:>9.1f} {stream['slope2_mb_per_m']:>8.1f}",
                flush=True,
            )
    finally:
        if args.dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"MB: RSS above a fresh process's with Python, numpy, pyarrow and the source imported (~{scan['base_mb']:.0f} MB); B/row: peak (scan) or kept (resume) bytes a row"
    )


if __name__ == "__main__":
    main()
