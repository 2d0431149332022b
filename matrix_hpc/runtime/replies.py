"""JSON out of an LLM reply: what :meth:`Agent.chat_json` and ``sampling.response_format`` check.

A model asked for JSON answers it bare, in a fenced block (```json ... ```), or inside prose;
:func:`extract_json` takes the first of these that parses. :func:`parse_reply` adds the schema
check and says, in one line, why a reply is not usable.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from ..config.schemas import first_mismatch

__all__ = ["NotJSON", "excerpt", "extract_json", "parse_reply"]

_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)```", re.DOTALL)
_DECODER = json.JSONDecoder()


class NotJSON(ValueError):
    """A reply holds no JSON value where one was looked for."""


def extract_json(text: str) -> Any:
    """The JSON in ``text``: the whole text, else the first fenced block that parses, else the
    first ``{...}`` object in it. Raises :class:`NotJSON` when there is none."""
    stripped = text.strip()
    if stripped:
        try:
            return json.loads(stripped)
        except ValueError:
            pass
    for block in _FENCE.findall(text):
        try:
            return json.loads(block.strip())
        except ValueError:
            continue
    start = text.find("{")
    while start != -1:  # raw_decode reads one value and ignores what follows it
        try:
            return _DECODER.raw_decode(text, start)[0]
        except ValueError:
            start = text.find("{", start + 1)
    raise NotJSON("has no JSON object" if stripped else "is empty")


def parse_reply(text: str, schema: Mapping[str, Any] | None) -> tuple[Any, str | None, str | None]:
    """``(value, kind, problem)``: the reply's JSON and, when it is not usable, the failure kind
    (``bad_reply``: no JSON; ``schema``: JSON that does not match) and why, said of the reply
    ("has no JSON object", "does not match the schema at $.score: ...")."""
    try:
        value = extract_json(text)
    except NotJSON as exc:
        return None, "bad_reply", str(exc)
    problem = first_mismatch(schema, value) if schema is not None else None
    return value, ("schema" if problem else None), (f"does not match the schema {problem}" if problem else None)


def excerpt(text: str, limit: int = 120) -> str:
    """The start of a reply for an error message, on one line."""
    line = " ".join(text.split())
    return repr(line if len(line) <= limit else line[: limit - 3] + "...")
