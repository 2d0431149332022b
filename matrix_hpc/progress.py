"""Live progress on the terminal: one redrawn line on a TTY, periodic log lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .runtime.runner import RunProgress

__all__ = ["ProgressDisplay", "format_progress"]


def format_progress(p: RunProgress) -> str:
    elapsed = max(p.elapsed_s, 1e-9)
    total = "" if p.remaining is None else f"/{p.done + p.remaining}"
    parts = [
        f"done {p.done}{total}",
        f"failed {p.failed}",
        f"in flight {p.in_flight}",
        f"{p.done / elapsed:.2f} tasks/s",
        f"{p.completion_tokens / elapsed:.0f} tok/s",
    ]
    if p.skipped:
        parts.append(f"resumed past {p.skipped}")
    if p.resent:
        parts.append(f"re-sent {p.resent}")
    return " | ".join(parts)


class ProgressDisplay:
    def __init__(self, mode: str = "auto", interval_s: float = 5.0, stream: TextIO = sys.stderr) -> None:
        if mode == "auto":
            mode = "bar" if stream.isatty() else "log"
        self.mode = mode
        self.interval_s = interval_s if mode == "log" else 0.2
        self.stream = stream
        self._last = 0.0

    def __call__(self, p: RunProgress) -> None:
        if self.mode == "off":
            return
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return
        self._last = now
        line = format_progress(p)
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
