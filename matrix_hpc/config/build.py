"""The one config builder: plain YAML data to typed dataclasses, every error naming its key.

Every section of the job spec (and the sandbox pool's settings, which a pool may
also be given on its own) goes through :func:`build`: unknown keys, wrong types,
missing required keys and a dataclass's own ``__post_init__`` checks all end as a
:class:`ConfigError` with the dotted key (``run.max_in_flight: expected int, got 'many'``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

import yaml

__all__ = ["ConfigError", "build", "merge", "parse_overrides"]


class ConfigError(ValueError):
    """A config problem; the message names the key or file and fits on one line."""


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` → nested dict; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is set twice")
        node[parts[-1]] = value
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def build(tp: Any, value: Any, key: str) -> Any:
    """Convert plain YAML data to ``tp``, naming ``key`` on any mismatch."""
    label = key or "config"
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return build(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{label}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads a bare off/on/no/yes as a bool
            value = next((c for c in choices if c in (("on", "yes", "true") if value else ("off", "no", "false"))), value)
        if value not in choices:
            raise ConfigError(f"{label}: expected one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{label}: expected a list, got {type(value).__name__}")
        return [build(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{label}: expected a mapping, got {type(value).__name__}")
        return {str(k): build(val_tp, v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            raise ConfigError(f"{label}: expected {tp.__name__}, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {label}")


def _build_dataclass(tp: Any, value: Any, key: str) -> Any:
    label = key or "config"
    if not isinstance(value, dict):
        raise ConfigError(f"{label}: expected a mapping, got {type(value).__name__}")
    hints = typing.get_type_hints(tp)
    fields = {f.name: f for f in dataclasses.fields(tp) if not f.metadata.get("internal")}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        sub = f"{key}." if key else ""
        raise ConfigError(f"unknown key {sub}{unknown[0]} (expected one of: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{key}.{name}" if key else name
        if name in value:
            kwargs[name] = build(hints[name], value[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{sub}: required key is missing")
    try:
        return tp(**kwargs)
    except ConfigError:
        raise
    except ValueError as exc:  # a section's own __post_init__ check: name the section
        raise ConfigError(f"{label}: {exc}") from None
