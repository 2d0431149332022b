"""``sampling.response_format``: a JSON schema every reply of a role must match.

The config holds the schema itself (or ``json``: any JSON object); :func:`response_format_body`
wraps it in OpenAI's ``response_format``, which every engine the project manages takes as is
(checked on each): vLLM's OpenAI server (``type: json_schema`` with ``json_schema: {name,
schema}``, guided decoding; ``type: json_object``) and llama.cpp's server behind the embedded
engine (the same two forms, turned into a grammar). External endpoints get the same OpenAI form.

Schemas are checked with ``jsonschema`` (a dependency of Ray, so present wherever a run is);
without it, a structural check stands in and replies are checked for being JSON objects only.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["JSON_SHORTHAND", "check_response_format", "first_mismatch", "reply_schema", "response_format_body", "schema_text"]

JSON_SHORTHAND = "json"
"""``response_format: json``: any JSON object, no schema."""

_ANY_OBJECT: dict[str, Any] = {"type": "object"}
_OPENAI_TYPES = ("json_schema", "json_object", "text")
_JSON_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}

try:
    import jsonschema
except ImportError:  # pragma: no cover - Ray depends on it
    jsonschema = None  # type: ignore[assignment]


def check_response_format(value: Any) -> str | None:
    """None when ``value`` is ``json`` or a JSON schema, else what is wrong (one line, no key)."""
    if value == JSON_SHORTHAND:
        return None
    if not isinstance(value, Mapping):
        got = repr(value) if isinstance(value, str | int | float | bool) else type(value).__name__
        return f"expected a JSON schema (a mapping) or {JSON_SHORTHAND!r}, got {got}"
    if value.get("type") in _OPENAI_TYPES:  # no JSON schema type: the user copied the request's form
        return f"give the schema itself (or {JSON_SHORTHAND!r}), not OpenAI's {{type: {value.get('type')}, ...}} wrapper: it is built for each engine"
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return f"not JSON: {exc}"
    if jsonschema is None:
        return _structural_problem(value, "$")
    try:
        jsonschema.validators.validator_for(value).check_schema(value)
    except jsonschema.SchemaError as exc:
        return f"not a valid JSON schema at {exc.json_path}: {_short(exc.message)}"
    return None


def _structural_problem(schema: Mapping[str, Any], path: str) -> str | None:
    """The minimal check without ``jsonschema``: known types, properties of schemas, required names."""
    types = schema.get("type")
    for t in types if isinstance(types, list) else [types] if types is not None else []:
        if t not in _JSON_TYPES:
            return f"not a valid JSON schema at {path}.type: {t!r} is not a JSON type"
    props = schema.get("properties", {})
    if not isinstance(props, Mapping) or not all(isinstance(v, Mapping | bool) for v in props.values()):
        return f"not a valid JSON schema at {path}.properties: expected a mapping of schemas"
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        return f"not a valid JSON schema at {path}.required: expected a list of names"
    for name, sub in props.items():
        problem = _structural_problem(sub, f"{path}.properties.{name}") if isinstance(sub, Mapping) else None
        if problem:
            return problem
    items = schema.get("items")
    return _structural_problem(items, f"{path}.items") if isinstance(items, Mapping) else None


def schema_text(value: Any) -> str | None:
    """The config's value as the resolved sampling keeps it: ``json``, or the schema's canonical JSON."""
    if value is None or value == JSON_SHORTHAND:
        return value
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


@functools.lru_cache(maxsize=64)
def response_format_body(text: str) -> dict[str, Any]:
    """OpenAI's ``response_format`` for :func:`schema_text`'s value (shared: do not mutate)."""
    if text == JSON_SHORTHAND:
        return {"type": "json_object"}
    schema = json.loads(text)
    title = schema.get("title") if isinstance(schema, dict) else None
    # OpenAI and vLLM require a name (OpenAI: [a-zA-Z0-9_-], at most 64).
    name = re.sub(r"[^A-Za-z0-9_-]", "_", title)[:64] if isinstance(title, str) and title else "reply"
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


def reply_schema(body: Any) -> Mapping[str, Any] | None:
    """The schema a reply is checked against, from the ``response_format`` a request carried
    (either OpenAI form); None for no format or ``text``."""
    if not isinstance(body, Mapping):
        return None
    kind = body.get("type")
    if kind == "json_schema":
        inner = body.get("json_schema")
        schema = inner.get("schema") if isinstance(inner, Mapping) else None
        return schema if isinstance(schema, Mapping) else _ANY_OBJECT
    if kind == "json_object":  # llama.cpp takes a schema here too
        schema = body.get("schema")
        return schema if isinstance(schema, Mapping) else _ANY_OBJECT
    return None


@functools.lru_cache(maxsize=64)
def _validator(text: str) -> Any:
    schema = json.loads(text)
    return jsonschema.validators.validator_for(schema)(schema)


def first_mismatch(schema: Mapping[str, Any], value: Any) -> str | None:
    """None when ``value`` matches ``schema``, else its first mismatch (path and reason)."""
    if jsonschema is None:
        if schema.get("type") == "object" and not isinstance(value, dict):
            return f"at $: expected an object, got {type(value).__name__}"
        return None
    validator = _validator(json.dumps(schema, sort_keys=True))
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    return None if error is None else f"at {error.json_path}: {_short(error.message)}"


def _short(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
