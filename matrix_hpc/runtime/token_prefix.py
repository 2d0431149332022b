"""Exact token continuation across a dialogue's turns (``sampling.return_token_ids`` on vLLM).

A chat server renders a call's messages into a prompt and tokenizes it. The previous reply is
in those messages as text, and its text, tokenized again, is not always the ids the model
sampled (BPE has several spellings of one string; the model may pick a non-canonical one). A
trainer that scores turn k+1 must see turn k's prompt and completion ids as its prefix, so a
role that asks for token ids gets its next prompt built from them:

    prompt(k+1) = prompt_ids(k) + completion_ids(k) + ids of what the template adds after the reply

The tail comes from the server's own tokenizer (vLLM's ``/tokenize`` with the messages:
the template ends the reply with its end-of-turn token, the model's own last token when it
stopped there) and the whole goes out in ``kv_transfer_params.prompt_token_ids``, which
vLLM's chat endpoint feeds to the engine as the prompt. It applies when the previous turn of
the same model has prompt and completion ids (the server gives them: vLLM does, the embedded
engine gives no prompt ids) and the new messages hold its reply, unedited, as an
``assistant`` message. Otherwise the call goes out as usual: its recorded ids are still what
the server used.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..services.llm.chat_types import Message
from .task import Turn

if TYPE_CHECKING:
    from ..services.llm.client import ChatClient

__all__ = ["continued_prompt", "splice"]

log = logging.getLogger(__name__)


def splice(prompt: Sequence[int], completion: Sequence[int], full: Sequence[int], open_reply: Sequence[int]) -> list[int] | None:
    """The next prompt's ids: ``prompt + completion``, then what ``full`` (the new messages rendered
    and tokenized) holds after the reply. ``open_reply``: the messages up to the reply rendered with
    the reply left open (its text, no end-of-turn). None when ``full`` does not begin with it."""
    n = len(open_reply)
    if list(full[:n]) != list(open_reply):
        return None
    rest = list(full[n:])
    if completion and rest and rest[0] == completion[-1]:  # the end-of-turn the model itself sampled
        rest = rest[1:]
    return [*prompt, *completion, *rest]


async def continued_prompt(client: ChatClient, messages: list[Message], turns: Sequence[Turn], model: str | None) -> list[int] | None:
    """The prompt ids that continue the task's previous turn of ``model`` exactly, or None (send
    the messages as usual): no such turn with ids, its reply not in ``messages``, no drift to
    mend, a history that is not the one the turn was asked with, or a server without ``/tokenize``."""
    prev, at = _previous(messages, turns, model)
    if prev is None or prev.tokens is None:
        return None
    prompt, completion = prev.tokens.array("prompt_ids"), prev.tokens.array("ids")
    if prompt is None or completion is None:
        return None
    prompt_ids, completion_ids = prompt.tolist(), completion.tolist()
    full = await client.tokenize(messages, prev.endpoint, add_generation_prompt=True)
    if full is None:
        return None
    head = prompt_ids + completion_ids
    if full[: len(head)] == head:
        return None  # the text tokenizes back to the sampled ids: the server renders this prefix itself
    open_reply = await client.tokenize(messages[: at + 1], prev.endpoint, add_generation_prompt=False, continue_final_message=True)
    ids = splice(prompt_ids, completion_ids, full, open_reply) if open_reply is not None else None
    if ids is not None and open_reply[: len(prompt_ids)] != prompt_ids:
        # The previous prompt is not the server's rendering of the history: an earlier drift mended
        # in it, or a history edited since. Mended is the same text; edited is not (and is sent as text).
        eot = len(full) > len(open_reply) and bool(completion_ids) and full[len(open_reply)] == completion_ids[-1]
        before = await client.detokenize(head[:-1] if eot else head, prev.endpoint)
        if before is None or before != await client.detokenize(open_reply, prev.endpoint):
            ids = None
    if ids is None:
        log.info("token ids: the messages do not line up with the previous turn's prompt and reply; sent as text")
    return ids


def _previous(messages: list[Message], turns: Sequence[Turn], model: str | None) -> tuple[Turn | None, int]:
    """The latest turn of ``model`` whose reply is an assistant message of ``messages``, and where."""
    for turn in reversed(turns):
        if turn.model != model or turn.error is not None or turn.tokens is None:
            continue
        for i in range(len(messages) - 1, -1, -1):
            m: Any = messages[i]
            if m.get("role") == "assistant" and m.get("content") == turn.text:
                return turn, i
        return None, -1  # the latest turn of the model is not in this dialogue: an older one is not continued
    return None, -1
