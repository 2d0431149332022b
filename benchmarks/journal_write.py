"""The call journal's write cost at a fixed call rate (what ``run.replay`` adds per LLM call).

    python -m benchmarks.journal_write --rate 1000 --seconds 10 [--dir /shared/fs/tmp]

One asyncio loop issues ``--rate`` calls a second, each as the runtime does it after an
LLM call returns: the request digest (``call_digest`` over ``--messages-bytes`` of
messages) and a journal append that returns once durable (group commit: one write +
fsync per flush window). A second pass does the same loop without the journal; the
difference in process CPU (all threads) is the journal's cost. Prints a table: CPU µs
per call, append latency p50/p99, fsyncs/s, bytes per call, file size.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from matrix_hpc.runtime.replay import _payload, call_digest
from matrix_hpc.services.llm import ChatResult
from matrix_hpc.store.journal import JournalEntry, JournalWriter


@dataclass
class Pass:
    label: str
    calls: int
    cpu_s: float
    wall_s: float
    lat: list[float]
    flushes: int = 0
    bytes: int = 0
    write_s: float = 0.0


def _messages(size: int, i: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You are a patient teacher."}, {"role": "user", "content": f"q{i} " + "w" * size}]


async def one_pass(label: str, rate: int, seconds: float, msg_bytes: int, writer: JournalWriter | None) -> Pass:
    total = int(rate * seconds)
    lat: list[float] = []
    res = ChatResult(text="Reasoning briefly: the two angles sum to 130, so the third is 50. The answer is (B).", prompt_tokens=180,
                     completion_tokens=40, latency_s=0.8, endpoint="http://10.0.0.1:8000/v1", model="m", finish_reason="stop")  # fmt: skip

    async def call(i: int) -> None:
        if msg_bytes < 0:  # the bare loop: what the two other passes add to
            return
        digest = call_digest(f"task-{i // 8}", i % 8, "teacher/m", _messages(msg_bytes, i), {"max_tokens": 256, "temperature": 0.7})
        if writer is not None:
            t = time.perf_counter()
            await writer.append(JournalEntry(digest, f"task-{i // 8}", _payload(res, time.time())))
            lat.append(time.perf_counter() - t)

    cpu0, t0 = time.process_time(), time.perf_counter()
    pending = []
    for i in range(total):  # open loop: calls arrive at the rate whatever the journal does
        await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
        pending.append(asyncio.create_task(call(i)))
    await asyncio.gather(*pending)
    p = Pass(label, total, time.process_time() - cpu0, time.perf_counter() - t0, lat)
    if writer is not None:
        p.flushes, p.bytes, p.write_s = writer.flushes, writer.bytes, writer.write_s
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description="CPU and latency of journaling LLM calls at a fixed rate.")
    ap.add_argument("--rate", type=int, default=1000, help="calls per second")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--messages-bytes", type=int, default=2000, help="size of each call's messages (digested, not stored)")
    ap.add_argument("--dir", type=Path, help="where the journal file goes (default: a temp dir; use the shared FS to measure it)")
    ap.add_argument("--no-fsync", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "bench.jnl"

        async def run() -> tuple[Pass, Pass, Pass]:
            bare = await one_pass("loop only", args.rate, args.seconds, -1, None)
            base = await one_pass("+ request digest", args.rate, args.seconds, args.messages_bytes, None)
            writer = JournalWriter(path, fsync=not args.no_fsync)
            on = await one_pass("+ digest + journal append", args.rate, args.seconds, args.messages_bytes, writer)
            await writer.close()
            return bare, base, on

        bare, base, on = asyncio.run(run())
        size = os.path.getsize(path)
    q = statistics.quantiles(on.lat, n=100)
    extra_cpu = (on.cpu_s - base.cpu_s) / on.calls
    print(f"\n{args.rate} calls/s for {args.seconds:.0f}s, fsync {'off' if args.no_fsync else 'on'}, journal in {args.dir or tempfile.gettempdir()}")
    print(f"{'pass':26} {'calls':>7} {'cpu µs/call':>12} {'wall s':>7}")
    for p in (bare, base, on):
        print(f"{p.label:26} {p.calls:7d} {1e6 * p.cpu_s / p.calls:12.1f} {p.wall_s:7.2f}")
    print(f"digest cost: {1e6 * (base.cpu_s - bare.cpu_s) / base.calls:.1f} µs CPU per call ({args.messages_bytes} bytes of messages)")
    print(f"journal cost: {1e6 * extra_cpu:.1f} µs CPU per call ({100 * extra_cpu * args.rate:.1f}% of one core at {args.rate} calls/s)")
    print(f"append latency (until durable): p50 {1e3 * q[49]:.2f} ms, p99 {1e3 * q[98]:.2f} ms")
    print(
        f"flushes: {on.flushes} ({on.flushes / on.wall_s:.0f}/s, {on.calls / max(on.flushes, 1):.1f} calls each); write+fsync {1e3 * on.write_s / max(on.flushes, 1):.2f} ms per flush"
    )
    print(f"size: {on.bytes / on.calls:.0f} bytes per call; file {size / 2**20:.2f} MiB for {on.calls} calls (before compaction)")


if __name__ == "__main__":
    main()
