"""Run one sandbox command line as an async subprocess: deadline, capped output, kill.

The command runs in its own session so a timeout, an output overflow or a
cancellation kills its whole process group; the runtimes put ``--die-with-parent``
style ties below that, so nothing the payload started outlives the kill.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ...procs import pid_alive
from .base import ExecResult, SandboxLimits, classify_exit

__all__ = ["RawResult", "pid_alive", "run_argv"]

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024
_DRAIN_AFTER_KILL_S = 2.0  # a pipe still held by an escaped process must not hang us


@dataclass(slots=True)
class RawResult:
    stdout: bytes
    stderr: bytes
    exit_code: int
    timed_out: bool
    output_overflow: bool
    duration_s: float


class _Capture:
    """Keeps the first ``cap`` bytes of a stream; past that it asks for a kill."""

    def __init__(self, cap: int, on_overflow: asyncio.Event) -> None:
        self.cap = cap
        self.buf = bytearray()
        self.on_overflow = on_overflow

    async def pump(self, stream: asyncio.StreamReader) -> None:
        # Past the cap, keep reading and discarding until the kill closes the pipe:
        # an unread pipe pauses the transport, and the process's exit is then never seen.
        while chunk := await stream.read(_CHUNK):
            room = self.cap - len(self.buf)
            if len(chunk) > room:
                self.buf += chunk[:room]
                self.on_overflow.set()
            else:
                self.buf += chunk


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def run_argv(argv: list[str], *, deadline_s: float, max_output: int, stdin: bytes | None = None, pass_fds: Sequence[int] = ()) -> RawResult:
    """Run ``argv``; kill its process group after ``deadline_s`` or ``max_output`` bytes on a stream."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        pass_fds=tuple(pass_fds),
    )
    overflow = asyncio.Event()
    out, err = _Capture(max_output, overflow), _Capture(max_output, overflow)
    assert proc.stdout is not None and proc.stderr is not None
    pumps = [asyncio.ensure_future(out.pump(proc.stdout)), asyncio.ensure_future(err.pump(proc.stderr))]
    if stdin is not None:
        pumps.append(asyncio.ensure_future(_feed(proc, stdin)))
    done_all = asyncio.ensure_future(_finish(proc, pumps))
    overflow_wait = asyncio.ensure_future(overflow.wait())
    timed_out = False
    try:
        finished, _ = await asyncio.wait({done_all, overflow_wait}, timeout=deadline_s, return_when=asyncio.FIRST_COMPLETED)
        if done_all not in finished:
            timed_out = overflow_wait not in finished
            _kill_group(proc)
            await proc.wait()
            await asyncio.wait(pumps, timeout=_DRAIN_AFTER_KILL_S)
    except asyncio.CancelledError:
        _kill_group(proc)
        raise
    finally:
        overflow_wait.cancel()
        for task in (*pumps, done_all):
            task.cancel()
        if proc.returncode is None:  # cancelled: reap without blocking the caller's cancellation
            asyncio.get_running_loop().create_task(proc.wait())
    return RawResult(
        stdout=bytes(out.buf),
        stderr=bytes(err.buf),
        exit_code=proc.returncode if proc.returncode is not None else -signal.SIGKILL,
        timed_out=timed_out,
        output_overflow=overflow.is_set(),
        duration_s=time.monotonic() - started,
    )


async def _feed(proc: asyncio.subprocess.Process, data: bytes) -> None:
    assert proc.stdin is not None
    try:
        proc.stdin.write(data)
        await proc.stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the payload did not read all of its input: its business
    finally:
        proc.stdin.close()


async def _finish(proc: asyncio.subprocess.Process, pumps: Sequence[asyncio.Future[None]]) -> None:
    await asyncio.gather(*pumps)
    await proc.wait()


async def run_limited(argv: list[str], limits: SandboxLimits, stdin: bytes | None = None, pass_fds: Sequence[int] = ()) -> ExecResult:
    """Run a sandbox command line under ``limits`` and say why it was killed, if it was."""
    raw = await run_argv(argv, deadline_s=limits.wall_s, max_output=limits.output_kb * 1024, stdin=stdin, pass_fds=pass_fds)
    return ExecResult(
        stdout=raw.stdout.decode(errors="replace"),
        stderr=raw.stderr.decode(errors="replace"),
        exit_code=raw.exit_code,
        timed_out=raw.timed_out,
        killed_reason=classify_exit(raw.exit_code, raw.stderr, raw.timed_out, raw.output_overflow),
        duration_s=raw.duration_s,
    )
    return True
