"""A record's dialogue as chat messages: the list of ``{role, content}`` that chat-template
trainers (TRL's SFTTrainer and the like) take as is. The mapping (docs/hf-export.md):

* The opening ``user`` message is the task's prompt: the row's own ``messages`` if it
  holds a list of ``{role, content}`` (kept as they are), else the first of the row's
  ``prompt``, ``question``, ``problem``, ``instruction``, ``input``, ``text`` that is a
  non-empty string; a row with none of them opens with no message.
* Each turn that produced text follows in order: the role that spoke last in the
  dialogue (the one whose reply ends it: the student answering a teacher, the only
  role of a one-role workflow) is ``assistant``; every other role is ``user`` (it is
  the assistant's interlocutor). A turn that failed (``error``) or is empty is left out.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PROMPT_FIELDS", "record_messages"]

PROMPT_FIELDS = ("prompt", "question", "problem", "instruction", "input", "text")


def _opening(row: Any) -> list[dict[str, str]]:
    if not isinstance(row, dict):
        return []
    given = row.get("messages")
    if isinstance(given, list) and given and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in given):
        return [{"role": m["role"], "content": m["content"]} for m in given]
    for name in PROMPT_FIELDS:
        value = row.get(name)
        if isinstance(value, str) and value.strip():
            return [{"role": "user", "content": value}]
    return []


def record_messages(rec: dict[str, Any]) -> list[dict[str, str]]:
    """The record's dialogue as ``[{"role": "user"|"assistant"|..., "content": str}]``."""
    turns = [t for t in rec.get("turns") or [] if isinstance(t, dict) and not t.get("error") and isinstance(t.get("text"), str) and t["text"]]
    out = _opening(rec.get("row"))
    if turns:
        last = turns[-1].get("role")
        out.extend({"role": "assistant" if t.get("role") == last else "user", "content": t["text"]} for t in turns)
    return out
