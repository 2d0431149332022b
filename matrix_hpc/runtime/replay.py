"""Turn-level resume: a completed LLM call is journaled and, in a later life, replayed.

An agent actor incarnation owns one :class:`Replay` over its journal segment: it writes
the calls its agents complete to its own journal file and looks calls up in the journal
files that existed when it started (earlier lives, earlier incarnations) and in its own.
Which files exist when, and what a crash leaves, is the journal's lifecycle: its one
owner is store/call_journal.py (:class:`~matrix_hpc.store.call_journal.CallJournal`).

The key of a call is a digest of everything that decides its answer: the task id,
the call's sequence number within the task (``Task.llm_calls``, which starts at 0
on every attempt, so a resumed task recomputes the same numbers), the model name,
the full messages and the sampling fields. An edited prompt or changed sampling
misses and calls the LLM: replay is never wrong, at worst it does not happen.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, fields
from typing import Any

from ..services.llm.chat_types import ChatResult
from ..store.call_journal import JournalSegment
from ..store.journal import JournalEntry
from ..store.token_trace import TokenTrace

__all__ = ["Replay", "ReplayStats", "call_digest"]

log = logging.getLogger(__name__)


def call_digest(task_id: str, seq: int, model: str, messages: list[Any], sampling: dict[str, Any]) -> str:
    """The identity of one LLM call (see the module docstring)."""
    key = json.dumps([task_id, seq, model, messages, sampling], sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    # surrogatepass: a prompt holding a lone surrogate (from a row or an earlier reply) still has
    # a digest, the same in every life; text that encodes gives the digest it always had.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _payload(res: ChatResult, started_at: float) -> dict[str, Any]:
    return {
        "text": res.text, "tool_calls": res.tool_calls, "prompt_tokens": res.prompt_tokens,
        "completion_tokens": res.completion_tokens, "latency_s": res.latency_s, "endpoint": res.endpoint,
        "model": res.model, "finish_reason": res.finish_reason, "started_at": started_at,
        "tokens": res.tokens.to_dict() if res.tokens is not None else None,
    }  # fmt: skip


@dataclass(frozen=True)
class ReplayStats:
    """One incarnation's replay and journal counters; ``+`` adds a team's (``disabled``: the first reason)."""

    hits: int = 0
    """Calls answered from the journal."""
    misses: int = 0
    saved_s: float = 0.0
    """The original latency of the calls answered (summed: they overlapped)."""
    saved_tokens: int = 0
    entries: int = 0
    """Calls journaled."""
    flushes: int = 0
    bytes: int = 0
    """Bytes appended (before compaction)."""
    write_s: float = 0.0
    """Seconds in write + fsync."""
    file_bytes: int = 0
    """The segment's size now (after compaction)."""
    disabled: str | None = None
    """Why the segment stopped writing (an I/O error), or None."""

    def __add__(self, other: ReplayStats) -> ReplayStats:
        summed = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self) if f.name != "disabled"}
        return ReplayStats(**summed, disabled=self.disabled or other.disabled)


class Replay:
    """The journal as an agent actor sees it: ``lookup`` before a call, ``record`` after."""

    def __init__(self, segment: JournalSegment) -> None:
        self.segment = segment
        self.hits = self.misses = 0
        self.saved_s = 0.0
        self.saved_tokens = 0

    def lookup(self, digest: str) -> tuple[ChatResult, float] | None:
        """The stored answer and its original start time, or None (call the LLM)."""
        entry = self.segment.get(digest)
        if entry is None:
            self.misses += 1
            return None
        p = entry.payload
        try:
            tokens = TokenTrace.from_dict(p["tokens"]) if p.get("tokens") is not None else None
        except (ValueError, AttributeError) as exc:  # a miss, never a turn without what it asked for
            log.warning("replay: journaled call %s: %s; calling the LLM again", digest[:12], exc)
            self.misses += 1
            return None
        res = ChatResult(
            text=p["text"], prompt_tokens=p["prompt_tokens"], completion_tokens=p["completion_tokens"],
            latency_s=p["latency_s"], endpoint=p["endpoint"], model=p["model"],
            finish_reason=p.get("finish_reason"), tool_calls=p.get("tool_calls"), tokens=tokens,
        )  # fmt: skip
        self.hits += 1
        self.saved_s += res.latency_s
        self.saved_tokens += res.prompt_tokens + res.completion_tokens
        return res, float(p.get("started_at") or 0.0)

    def record(self, digest: str, task_id: str, res: ChatResult, started_at: float) -> None:
        """Journal a completed call. It is durable within one flush window (~10 ms): the task
        does not wait for the fsync, so a kill loses at most the calls of that window."""
        self.segment.append(JournalEntry(digest, task_id, _payload(res, started_at)))

    def stats(self) -> ReplayStats:
        w = self.segment.writer
        return ReplayStats(
            hits=self.hits, misses=self.misses, saved_s=self.saved_s, saved_tokens=self.saved_tokens,
            entries=w.entries, flushes=w.flushes, bytes=w.bytes, write_s=w.write_s, file_bytes=w.size, disabled=w.disabled,
        )  # fmt: skip
