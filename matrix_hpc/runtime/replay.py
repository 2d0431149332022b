"""Turn-level resume: a completed LLM call is journaled and, in a later life, replayed.

An agent actor incarnation owns one :class:`Replay`: it writes the calls its
agents complete to its own journal file and looks calls up in the journal files
that existed when it started (earlier lives, earlier incarnations) and in its own.

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
from pathlib import Path
from typing import Any

from ..services.llm import ChatResult
from ..store.journal import JournalEntry, JournalIndex, JournalWriter

__all__ = ["Replay", "call_digest"]

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
    }  # fmt: skip


class Replay:
    """The journal as an agent actor sees it: ``lookup`` before a call, ``record`` after."""

    def __init__(self, directory: str | Path, writer_name: str, fsync: bool = True, flush_interval_s: float = 0.01) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.writer = JournalWriter(self.dir / writer_name, flush_interval_s=flush_interval_s, fsync=fsync)
        self.index = JournalIndex(self.dir, exclude={writer_name})
        self.hits = self.misses = 0
        self.saved_s = 0.0
        self.saved_tokens = 0
        log.info("replay: %d journaled call(s) found in %s", len(self.index), self.dir)

    def lookup(self, digest: str) -> tuple[ChatResult, float] | None:
        """The stored answer and its original start time, or None (call the LLM)."""
        entry = self.index.get(digest) or self.writer.get(digest)
        if entry is None:
            self.misses += 1
            return None
        p = entry.payload
        res = ChatResult(
            text=p["text"], prompt_tokens=p["prompt_tokens"], completion_tokens=p["completion_tokens"],
            latency_s=p["latency_s"], endpoint=p["endpoint"], model=p["model"],
            finish_reason=p.get("finish_reason"), tool_calls=p.get("tool_calls"),
        )  # fmt: skip
        self.hits += 1
        self.saved_s += res.latency_s
        self.saved_tokens += res.prompt_tokens + res.completion_tokens
        return res, float(p.get("started_at") or 0.0)

    def record(self, digest: str, task_id: str, res: ChatResult, started_at: float) -> None:
        """Journal a completed call. It is durable within one flush window (~10 ms): the task
        does not wait for the fsync, so a kill loses at most the calls of that window."""
        self.writer.append_nowait(JournalEntry(digest, task_id, _payload(res, started_at)))

    async def flush(self) -> None:
        await self.writer.flush()

    async def compact(self, sink: Any) -> int:
        """Drop this writer's entries of tasks the sink has committed (one Ray call)."""
        ids = self.writer.task_ids()
        if not ids:
            return 0
        committed = set(await sink.committed.remote(ids))
        return await self.writer.compact(committed)

    def stats(self) -> dict[str, Any]:
        w = self.writer
        return {
            "hits": self.hits, "misses": self.misses, "saved_s": self.saved_s, "saved_tokens": self.saved_tokens,
            "entries": w.entries, "flushes": w.flushes, "bytes": w.bytes, "write_s": w.write_s, "file_bytes": w.size,
            "disabled": w.disabled,
        }  # fmt: skip

    async def close(self) -> None:
        await self.writer.close()
        self.index.close()
