"""LLM access: the async chat client and the servers the framework manages.

The names below are imported on first use: a module that reads an endpoint's status
(``status``, ``run.json``) does not pay for aiohttp and the client (~0.7 s of CPU).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...lazy import lazy_getattr

if TYPE_CHECKING:
    from .base import LLMServer, ServerStartError, probe_generation
    from .chat_types import ChatResult, LLMError, Message
    from .client import ChatClient
    from .embedded import EmbeddedEngine

__all__ = ["ChatClient", "ChatResult", "EmbeddedEngine", "LLMError", "LLMServer", "Message", "ServerStartError", "probe_generation"]

_HOME = {
    "LLMServer": ".base", "ServerStartError": ".base", "probe_generation": ".base",
    "ChatClient": ".client", "ChatResult": ".chat_types", "LLMError": ".chat_types", "Message": ".chat_types",
    "EmbeddedEngine": ".embedded",
}  # fmt: skip


__getattr__ = lazy_getattr(__name__, _HOME, globals())
