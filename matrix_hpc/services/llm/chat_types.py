"""What a chat call takes and gives (message, result, error), apart from the client.

An agent actor whose roles call no LLM, and the agent base that names these types, import
them without the client and its aiohttp (~7 MB of RSS per actor process, docs/performance.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...store.token_trace import TokenTrace

__all__ = ["ChatResult", "LLMError", "Message"]

Message = dict[str, str]  # {"role": ..., "content": ...}, the OpenAI wire shape


class LLMError(RuntimeError):
    """A chat call failed for good; ``kind`` is a short category for the record."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(slots=True)
class ChatResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    endpoint: str
    model: str = "default"
    """The model that answered, as the server names it (token accounting is kept per model)."""
    finish_reason: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    """OpenAI-format calls (``{"id", "type": "function", "function": {"name", "arguments"}}``), if any."""
    tokens: TokenTrace | None = None
    """Token ids and logprobs, when the request asked for them (``sampling.logprobs`` / ``return_token_ids``)."""
