"""Sandbox exec latency and throughput through one pool (a real Ray actor, real bubblewrap).

    python -m benchmarks.sandbox_exec [--runtime bubblewrap|apptainer] [--image SIF]
                                      [--execs 256] [--pool-size 16] [--repeats 3]

At 1, 16 and 128 concurrent callers, each holding a lease and running ``true``
(the runtime's fixed cost: namespaces, mounts, limits, process start), prints
p50/p99 latency of one ``exec`` as the caller sees it (Ray call included) and
executions per second; each number is the median of ``--repeats`` runs. Callers
beyond the pool size wait for a sandbox, as agents do.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import ray

from matrix_hpc.cluster.auth import RayAuth
from matrix_hpc.credentials import new_secret
from matrix_hpc.services.sandbox import SandboxPool, SandboxSession


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_round(pool: Any, concurrency: int, execs: int, cmd: list[str]) -> tuple[list[float], float]:
    """``execs`` commands spread over ``concurrency`` callers; per-exec latencies and wall time."""
    latencies: list[float] = []
    per_caller = [execs // concurrency + (i < execs % concurrency) for i in range(concurrency)]

    async def caller(i: int, n: int) -> None:
        async with SandboxSession(pool, f"bench-{i}", wait_s=600) as sb:
            for _ in range(n):
                t = time.perf_counter()
                res = await sb.exec(cmd)
                latencies.append(time.perf_counter() - t)
                if not res.ok:
                    raise RuntimeError(f"benchmark command failed: {res}")

    started = time.perf_counter()
    await asyncio.gather(*(caller(i, n) for i, n in enumerate(per_caller) if n))
    return latencies, time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sandbox_exec", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", default="bubblewrap", choices=["bubblewrap", "apptainer"])
    ap.add_argument("--image", help="the sandbox SIF (apptainer)")
    ap.add_argument("--execs", type=int, default=256, help="commands per measurement")
    ap.add_argument("--pool-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 128])
    args = ap.parse_args()

    RayAuth(token=new_secret())  # a private cluster, as a run's (token auth)
    ray.init(include_dashboard=False, log_to_driver=False, namespace="bench-sandbox")
    root = tempfile.mkdtemp(prefix="mhs-bench-", dir="/tmp")
    os.chmod(root, 0o711)
    cfg: dict[str, Any] = {"runtime": args.runtime, "size": args.pool_size, "root_dir": root, "idle_exit_s": None, "max_uses": 1_000_000}
    if args.image:
        cfg["apptainer"] = {"image": args.image}
    pool = SandboxPool.remote(cfg, "bench")
    try:
        ray.get(pool.ready.remote())
        asyncio.run(one_round(pool, 4, 32, ["/bin/true"]))  # warm up workers and caches
        print(f"sandbox exec: runtime={args.runtime} pool_size={args.pool_size} execs={args.execs} "
              f"repeats={args.repeats} cpus={os.cpu_count()} command=/bin/true")  # fmt: skip
        print(f"{'concurrent':>10} | {'p50 ms':>8} | {'p99 ms':>8} | {'execs/s':>8}")
        print(f"{'-' * 10}-+-{'-' * 8}-+-{'-' * 8}-+-{'-' * 8}")
        for conc in args.concurrency:
            p50s, p99s, rates = [], [], []
            for _ in range(args.repeats):
                lat, wall = asyncio.run(one_round(pool, conc, args.execs, ["/bin/true"]))
                p50s.append(percentile(lat, 0.50) * 1000)
                p99s.append(percentile(lat, 0.99) * 1000)
                rates.append(len(lat) / wall)
            print(f"{conc:>10} | {statistics.median(p50s):>8.1f} | {statistics.median(p99s):>8.1f} | {statistics.median(rates):>8.1f}")
    finally:
        ray.get(pool.shutdown.remote())
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
