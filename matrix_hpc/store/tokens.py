"""What LLM calls cost, added up: the one token-usage type of the project.

A record's ``usage.by_role`` / ``usage.by_model`` entries, run.json's ``usage``, the
replay summary, the sink's and the driver's counts, the view's facets and the Hugging
Face card all add up the same counters; they are all :class:`TokenUsage`, so a new
counter is one field here. Its dict is the on-disk form (records, run.json): the field
names are the keys, and :meth:`TokenUsage.from_dict` reads any older or newer dict
(a missing key is 0, an unknown one is ignored).

It lives in the store, the lowest layer that reads records, so every reader may import it.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any, NamedTuple

__all__ = ["TokenUsage"]

_new = tuple.__new__  # a named tuple's own __new__ is a Python function: skipped on the hot paths


class TokenUsage(NamedTuple):
    """LLM calls added up: their tokens, how many, how many failed, their summed latency.

    Immutable; ``a + b`` adds field by field (``sum(usages, TokenUsage())`` works too). Being a
    tuple, it is always true: test a counter (``if u.calls``), not the value.
    A named tuple rather than a frozen dataclass: it is built for every turn (the view adds
    up millions of them), and a frozen dataclass is 3-4x slower to build.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    errors: int = 0
    """Calls that failed for good (after retries)."""
    latency_s: float = 0.0
    """Summed over calls; see :attr:`mean_latency_s`."""

    @classmethod
    def of_call(cls, prompt_tokens: int, completion_tokens: int, latency_s: float, failed: bool) -> TokenUsage:
        """One LLM call."""
        return _new(cls, (prompt_tokens, completion_tokens, 1, int(failed), latency_s))

    @classmethod
    def of_turn(cls, turn: Mapping[str, Any]) -> TokenUsage:
        """One LLM call as a record's turn stores it (a missing or null count is 0)."""
        get = turn.get
        return _new(cls, (int(get("prompt_tokens") or 0), int(get("completion_tokens") or 0), 1, int(get("error") is not None), float(get("latency_s") or 0.0)))

    def __add__(self, other: Any) -> TokenUsage:  # type: ignore[override]  # field by field, not tuple concatenation
        if other.__class__ is not TokenUsage:
            return NotImplemented
        return _new(TokenUsage, map(operator.add, self, other))

    @property
    def total(self) -> int:
        """Prompt and completion tokens together."""
        return self.prompt_tokens + self.completion_tokens

    @property
    def mean_latency_s(self) -> float:
        return self.latency_s / self.calls if self.calls else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Every counter by its field name."""
        return dict(zip(_FIELDS, self))

    def token_counts(self) -> dict[str, int]:
        """The ``*_tokens`` counters alone: a record's totals and the store's columns are these."""
        return {n: getattr(self, n) for n in _TOKENS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> TokenUsage:
        """From :meth:`to_dict`'s form, of this version or another: missing or null counts are 0, unknown keys ignored."""
        data = data or {}
        return cls(*(_KIND[n](data.get(n) or 0) for n in _FIELDS))


_FIELDS = TokenUsage._fields
_TOKENS = tuple(n for n in _FIELDS if n.endswith("_tokens"))
_KIND = {n: float if isinstance(d, float) else int for n, d in TokenUsage._field_defaults.items()}
