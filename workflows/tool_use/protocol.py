"""Tool calls on the wire: parsing them from a reply, and rendering the conversation.

The trajectory is kept in OpenAI chat format (assistant messages with
``tool_calls``, ``tool`` messages with results). Two ways to talk to a model:

* ``native``: send ``tools=[...]`` and the messages as they are; read ``tool_calls``.
* ``text``: describe the tools in the system prompt, ask for a JSON object
  ``{"tool": NAME, "arguments": {...}}`` in the reply, and show results as user
  messages. For servers without tool-call templates (the embedded engine).

Either way a reply without ``tool_calls`` is searched for such a JSON object, and a
reply with neither is an ordinary assistant message.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["ToolCall", "from_openai", "parse_text_calls", "recent", "render", "tool_prompt", "user_view"]

_DECODER = json.JSONDecoder()
MAX_CALLS_PER_REPLY = 4


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


def _new_id() -> str:
    return "call_" + uuid.uuid4().hex[:12]


def from_openai(calls: Iterable[dict[str, Any]], known: set[str]) -> list[ToolCall]:
    """Calls from a response's ``tool_calls``; unknown names and non-object arguments are dropped."""
    out = []
    for call in calls:
        fn = call.get("function") or {}
        name, raw = fn.get("name"), fn.get("arguments", "{}")
        try:
            args = json.loads(raw) if isinstance(raw, str) else raw
        except ValueError:
            continue
        if name in known and isinstance(args, dict):
            out.append(ToolCall(str(call.get("id") or _new_id()), name, args))
    return out[:MAX_CALLS_PER_REPLY]


def parse_text_calls(text: str, known: set[str]) -> list[ToolCall]:
    """JSON tool calls written in a reply: ``{"tool": ..., "arguments": {...}}`` (also ``name``/``function``)."""
    calls: list[ToolCall] = []
    pos = text.find("{")
    while pos != -1 and len(calls) < MAX_CALLS_PER_REPLY:
        try:
            obj, end = _DECODER.raw_decode(text, pos)
        except ValueError:
            pos = text.find("{", pos + 1)
            continue
        call = _as_call(obj, known)
        if call is not None:
            calls.append(call)
            pos = text.find("{", end)
        else:
            pos = text.find("{", pos + 1)
    return calls


def _as_call(obj: Any, known: set[str]) -> ToolCall | None:
    if not isinstance(obj, dict):
        return None
    name = obj.get("tool") or obj.get("name") or obj.get("function")
    if isinstance(name, dict):  # {"function": {"name": ..., "arguments": ...}}
        obj, name = name, name.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if name not in known or not isinstance(args, dict):
        return None
    return ToolCall(_new_id(), name, args)


def tool_prompt(schemas: list[dict[str, Any]]) -> str:
    """The tool list and call format for ``text`` mode, with an example to copy."""
    lines = ["You can use these tools:"]
    for s in schemas:
        fn = s["function"]
        params = ", ".join(fn["parameters"]["properties"])
        lines.append(f"- {fn['name']}({params}): {fn['description']}")
    lines += [
        "To use a tool, reply with only a JSON object, for example:",
        '{"tool": "get_order", "arguments": {"order_id": "W1001"}}',
        "You will get the result and can then use another tool or answer the customer.",
    ]
    return "\n".join(lines)


def render(messages: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """The trajectory as sent to the model: unchanged for ``native``, tool traffic as text for ``text``."""
    if mode == "native":
        return messages
    out: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [{"tool": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])} for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(json.dumps(c) for c in calls)})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"Result of {m.get('name', 'the tool')}: {m['content']}"})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    return out


def recent(messages: list[dict[str, Any]], max_chars: int) -> list[dict[str, Any]]:
    """The latest messages that fit in ``max_chars`` of content (at least the last one).

    Small context windows overflow on long dialogues. The cut never falls between a
    tool call and its results: no server accepts a result without its call.
    """
    start = len(messages)
    size = 0
    while start > 0:
        m = messages[start - 1]
        size += len(m.get("content") or "") + sum(len(c["function"]["arguments"]) + 20 for c in m.get("tool_calls") or [])
        if start < len(messages) and size > max_chars:
            break
        start -= 1
    while 0 < start < len(messages) and messages[start]["role"] == "tool":
        start -= 1  # reach back to the assistant message that made the call
    return messages[start:]


def user_view(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation as the simulated customer sees it: roles swapped, tool traffic hidden."""
    out = []
    for m in messages:
        if m["role"] == "user":
            out.append({"role": "assistant", "content": m["content"]})
        elif m["role"] == "assistant" and (m.get("content") or "").strip() and not m.get("tool_calls"):
            out.append({"role": "user", "content": m["content"]})
    return out
