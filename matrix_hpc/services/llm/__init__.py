"""LLM access: the async chat client and the servers the framework manages.

The names below are imported on first use: a module that reads an endpoint's status
(``status``, ``run.json``) does not pay for aiohttp and the client (~0.7 s of CPU).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import LLMServer, ServerStartError, probe_generation
    from .client import ChatClient, ChatResult, LLMError, Message
    from .embedded import EmbeddedEngine

__all__ = ["ChatClient", "ChatResult", "EmbeddedEngine", "LLMError", "LLMServer", "Message", "ServerStartError", "probe_generation"]

_HOME = {
    "LLMServer": ".base", "ServerStartError": ".base", "probe_generation": ".base",
    "ChatClient": ".client", "ChatResult": ".client", "LLMError": ".client", "Message": ".client",
    "EmbeddedEngine": ".embedded",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value
