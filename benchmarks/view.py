"""``matrix-hpc view`` on big stores: how fast it opens, pages, filters and searches, and its memory.

    python -m benchmarks.view                       # 10k, 100k and 1M records, medians of 3
    python -m benchmarks.view --sizes 10000 --repeat 1

Stores are written once with the real store writer (collab-reasoning-shaped records of
~1.7 KB: a question, two turns of random words, usage; 8% failed over three kinds) under
``--dir`` and kept for the next time. Each measurement is a fresh process that starts
the viewer's real aiohttp server and asks it over HTTP on loopback:

* first page: viewer created -> the run page's data and the table's first page answered;
* all counted: the same start -> status and failure kind of every record read (the counts whole);
* page: a page from the middle of the table (offset N/2), once times and tokens are read too;
* filter: failed records of one kind, sorted by tokens (descending);
* search (1st page): a word most records hold, first page of matches;
* search (all): a text one record holds, asked again until the whole store is searched;
* (its CPU): the process's CPU time over the same span (user + system, every thread);
* RSS: the process after the first page, and after the background read of every record
  (facets: roles, models, turns, latency), whose time is the last column.

The stores' files are in the page cache (just written or read by the previous round): a
cold read from a cluster file system adds its read time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

WORDS = ("the answer is because we first note that each side of a triangle angle sum equals hence option so student teacher "
         "think again carefully correct wrong maybe area radius circle volume cube number prime even odd value result "
         "therefore compute multiply divide add subtract check agree disagree explain reason step final choice").split()  # fmt: skip
KINDS = ("llm_timeout", "agent_error", "bad_input")


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n)) + f" The answer is ({rng.choice('ABCD')})."


def _record(i: int, rng: random.Random) -> dict[str, Any]:
    failed = rng.random() < 0.08
    turns = []
    t0 = 1.7e9 + i * 0.01
    for k, role in enumerate(("teacher", "student")):
        turns.append({"role": role, "text": _text(rng, rng.randint(40, 90)), "prompt_tokens": rng.randint(100, 400), "completion_tokens": rng.randint(20, 96),
                      "started_at": t0 + k, "latency_s": rng.lognormvariate(0, 0.6), "endpoint": "http://10.0.0.7:8000/v1", "model": rng.choice(("small", "large")),
                      "served_model": "m", "max_tokens": 96, "temperature": 0.7, "error": None, "replayed": rng.random() < 0.02})  # fmt: skip
    return {
        "id": f"q{i:07d}", "status": "failed" if failed else "ok",
        "error": {"kind": rng.choice(KINDS), "message": f"row q{i:07d}: something went wrong", "role": "teacher", "traceback": None} if failed else None,
        "row": {"id": f"q{i:07d}", "question": f"What is {i} times {i % 97}?", "choices": ["one", "two", "three", "four"], "answer": "A"},
        "result": None if failed else {"agreed": rng.random() < 0.6, "turns": 2, "correct": rng.random() < 0.4},
        "turns": turns, "attempt": 1, "hops": 4, "created_at": t0, "finished_at": t0 + 3,
        "usage": {"prompt_tokens": sum(t["prompt_tokens"] for t in turns), "completion_tokens": sum(t["completion_tokens"] for t in turns)},
    }  # fmt: skip


def build_store(root: Path, n: int) -> None:
    from matrix_hpc.store import RecordRow, StoreWriter

    if (root / "part-000" / "commit.json").exists() and json.loads((root / "part-000" / "commit.json").read_text())["rows"] == n:
        return
    print(f"writing {n:,} records to {root} ...", file=sys.stderr, flush=True)
    rng = random.Random(n)
    w = StoreWriter(root, chunk_rows=256, fsync=False)
    for lo in range(0, n, 8192):
        w.append([RecordRow.from_record(_record(i, rng)) for i in range(lo, min(n, lo + 8192))])
        w.commit()
    w.close()


async def _measure(root: Path) -> dict[str, float]:
    import aiohttp
    import psutil
    from aiohttp import web

    from matrix_hpc.view.server import Viewer, make_app

    proc = psutil.Process()
    token = "bench"

    def cpu() -> float:
        c = proc.cpu_times()
        return c.user + c.system

    c0 = cpu()
    t0 = time.perf_counter()
    viewer = Viewer(root)
    runner = web.AppRunner(make_app(viewer, token, lambda: 0), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    viewer.start()
    out: dict[str, float] = {}
    async with aiohttp.ClientSession(headers={"X-Matrix-Token": token}) as s:

        async def get(path: str) -> Any:
            async with s.get(f"http://127.0.0.1:{port}{path}") as r:
                assert r.status == 200, (path, r.status, await r.text())
                return await r.json()

        run, first = await asyncio.gather(get("/api/run"), get("/api/records?limit=50"))
        out["first_page_s"] = time.perf_counter() - t0
        out["first_page_cpu_s"] = cpu() - c0
        n = run["committed"]
        assert len(first["rows"]) == min(50, n) and first["total"] == n
        out["rss_open_mb"] = proc.memory_info().rss / 2**20
        while run["indexed"] < n:  # status and failure kind of every record: the counts are whole
            await asyncio.sleep(0.02)
            run = await get("/api/run")
        out["counted_s"] = time.perf_counter() - t0
        while run["counts"]["prompt_tokens"] is None:  # times and tokens: read right after (step 2 of docs/view.md)
            await asyncio.sleep(0.02)
            run = await get("/api/run")

        t = time.perf_counter()
        await get(f"/api/records?offset={n // 2}&limit=50")
        out["page_s"] = time.perf_counter() - t

        t = time.perf_counter()
        await get("/api/records?status=failed&kind=agent_error&sort=tokens&desc=1&limit=50")
        out["filter_s"] = time.perf_counter() - t

        t = time.perf_counter()
        r = await get("/api/records?q=triangle&limit=50")
        assert len(r["rows"]) == 50
        out["search_first_s"] = time.perf_counter() - t

        t, c = time.perf_counter(), cpu()
        needle = f"q{n // 2 + 3:07d}"
        while True:
            r = await get(f"/api/records?q={needle}&limit=50")
            if r["complete"]:
                break
        assert [x["id"] for x in r["rows"]] == [needle], r["rows"]
        out["search_all_s"] = time.perf_counter() - t
        out["search_all_cpu_s"] = cpu() - c

        while True:  # the background read of every record's JSON
            run = await get("/api/run")
            if run["faceted"] >= n:
                break
            await asyncio.sleep(0.2)
        out["facets_s"] = time.perf_counter() - t0
        out["rss_end_mb"] = proc.memory_info().rss / 2**20
    await runner.cleanup()
    await viewer.close()
    return out


COLUMNS = (("first_page_s", "first page"), ("first_page_cpu_s", "(its CPU)"), ("counted_s", "all counted"), ("page_s", "page"), ("filter_s", "filter"), ("search_first_s", "search (1st page)"),
           ("search_all_s", "search (all)"), ("search_all_cpu_s", "(its CPU)"), ("rss_open_mb", "RSS open"), ("rss_end_mb", "RSS end"), ("facets_s", "all read"))  # fmt: skip


def _fmt(key: str, v: float) -> str:
    if key.endswith("_mb"):
        return f"{v:.0f} MB"
    return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000", help="records per store, comma separated")
    ap.add_argument("--repeat", type=int, default=3, help="fresh processes per size (the table shows medians)")
    ap.add_argument("--dir", default="/tmp/matrix-hpc-bench-view", help="where the stores are written (and kept)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one measurement of one store, as JSON
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(asyncio.run(_measure(Path(args.measure)))))
        return 0
    rows = []
    load0 = os.getloadavg()[0]
    for n in [int(s) for s in args.sizes.split(",") if s]:
        root = Path(args.dir) / f"store-{n}"
        build_store(root, n)
        runs = []
        for _ in range(args.repeat):
            res = subprocess.run(
                [sys.executable, "-m", "benchmarks.view", "--measure", str(root)],
                capture_output=True,
                text=True,
                check=False,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            if res.returncode != 0:
                print(res.stderr, file=sys.stderr)
                return 1
            runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
        rows.append((n, {k: statistics.median(r[k] for r in runs) for k, _ in COLUMNS}))
    print(f"| records | {' | '.join(label for _, label in COLUMNS)} |")
    print("|---:|" + "---:|" * len(COLUMNS))
    for n, med in rows:
        print(f"| {n:,} | " + " | ".join(_fmt(k, med[k]) for k, _ in COLUMNS) + " |")
    print(f"\n{os.cpu_count()} CPUs; load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (wall times grow with it, CPU times much less)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
