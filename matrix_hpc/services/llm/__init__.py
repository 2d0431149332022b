"""LLM access: the async chat client and the servers the framework manages."""

from .base import LLMServer, ServerStartError, probe_generation
from .client import ChatClient, ChatResult, LLMError, Message
from .embedded import EmbeddedEngine

__all__ = ["ChatClient", "ChatResult", "EmbeddedEngine", "LLMError", "LLMServer", "Message", "ServerStartError", "probe_generation"]
