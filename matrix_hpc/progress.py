"""Live progress on the terminal: one redrawn line on a TTY, periodic log lines otherwise."""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import TextIO

from .runtime.runner import RunProgress

__all__ = ["LLMRate", "ProgressDisplay", "format_progress"]


def format_progress(p: RunProgress, llm: dict[str, tuple[float, float]] | None = None) -> str:
    """``llm``: calls/s and output tokens/s per role lately (:class:`LLMRate`); without it, the
    averages since the start. Tasks/s counts finished tasks; the LLM rates count every call,
    so multi-turn tasks still in flight show movement (a slow machine is not a hang)."""
    elapsed = max(p.elapsed_s, 1e-9)
    total = "" if p.remaining is None else f"/{p.done + p.remaining}"
    parts = [f"done {p.done}{total}", f"failed {p.failed}", f"in flight {p.in_flight}", f"{p.done / elapsed:.2f} tasks/s"]
    if llm is None:
        llm = {role: (calls / elapsed, tokens / elapsed) for role, (calls, tokens) in p.llm_by_role.items()}
    calls, tokens = sum(c for c, _ in llm.values()), sum(t for _, t in llm.values())
    line = f"LLM {calls:.1f} calls/s {tokens:.0f} tok/s"
    if len(llm) > 1:
        line += " (" + ", ".join(f"{role} {c:.1f}/s {t:.0f} tok/s" for role, (c, t) in sorted(llm.items())) + ")"
    parts.append(line)
    if p.skipped:
        parts.append(f"resumed past {p.skipped}")
    if p.resent:
        parts.append(f"re-sent {p.resent}")
    return " | ".join(parts)


class LLMRate:
    """LLM calls/s and output tokens/s per role over the last ``window_s``, from the run's
    cumulative counts (:attr:`RunProgress.llm_by_role`)."""

    def __init__(self, window_s: float = 30.0) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, dict[str, tuple[int, int]]]] = deque()

    def update(self, now: float, counts: dict[str, tuple[int, int]]) -> dict[str, tuple[float, float]]:
        self._samples.append((now, dict(counts)))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()
        t0, first = self._samples[0]
        span = now - t0
        if span <= 0:
            return {}
        out = {}
        for role, (calls, tokens) in counts.items():
            c0, k0 = first.get(role, (0, 0))
            out[role] = ((calls - c0) / span, (tokens - k0) / span)
        return out


class ProgressDisplay:
    def __init__(self, mode: str = "auto", interval_s: float = 5.0, stream: TextIO = sys.stderr) -> None:
        if mode == "auto":
            mode = "bar" if stream.isatty() else "log"
        self.mode = mode
        self.interval_s = interval_s if mode == "log" else 0.2
        self.stream = stream
        self._last = 0.0
        self._rate: LLMRate | None = None

    def __call__(self, p: RunProgress) -> None:
        if self.mode == "off":
            return
        now = time.monotonic()
        if self._rate is None:  # the window starts at the run's start, with nothing counted
            self._rate = LLMRate()
            self._rate.update(p.started_at, {})
        if now - self._last < self.interval_s:
            return
        self._last = now
        line = format_progress(p, self._rate.update(now, p.llm_by_role))
        if self.mode == "bar":
            self.stream.write(f"\r\x1b[2K{line}")
        else:
            self.stream.write(f"[{time.strftime('%H:%M:%S')}] {line}\n")
        self.stream.flush()

    def event(self, message: str) -> None:
        """A line for the user (a notice, a warning): on its own line, under the bar."""
        if self.mode == "bar":
            self.stream.write("\r\x1b[2K")
            self._last = 0.0  # redraw the bar on the next update
        self.stream.write(message + "\n")
        self.stream.flush()

    def close(self, p: RunProgress) -> None:
        if self.mode == "bar":
            self.stream.write(f"\r\x1b[2K{format_progress(p)}\n")
            self.stream.flush()
