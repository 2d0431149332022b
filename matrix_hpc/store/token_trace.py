"""A turn's token ids and logprobs (``sampling.return_token_ids`` / ``sampling.logprobs``), kept compactly.

A :class:`TokenTrace` holds each sequence as raw little-endian bytes (``int32`` ids,
``float32`` logprobs): 4 bytes a token where JSON text per token takes 6 to 20, and one
``bytes`` object to pickle at every hop rather than a list of numbers. In the record (JSON)
each is base64 text (:meth:`TokenTrace.to_dict`)::

    "tokens": {"prompt_ids": B64, "ids": B64, "logprobs": B64, "top_n": N, "top_ids": B64, "top_logprobs": B64}

``top_ids``/``top_logprobs`` are ``len(ids) x top_n``, row by row. A field the engine did not
give is ``null``. The exports decode them into lists (:func:`expand`).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["TokenTrace", "expand"]

_IDS = np.dtype("<i4")
_LOGPROBS = np.dtype("<f4")
_FIELDS = ("prompt_ids", "ids", "logprobs", "top_ids", "top_logprobs")
_DTYPES = {"prompt_ids": _IDS, "ids": _IDS, "logprobs": _LOGPROBS, "top_ids": _IDS, "top_logprobs": _LOGPROBS}


def _pack(values: Sequence[float] | Sequence[int] | None, dtype: np.dtype) -> bytes | None:
    return None if values is None else np.asarray(values, dtype=dtype).tobytes()


@dataclass(slots=True)
class TokenTrace:
    """Token ids and logprobs of one LLM call (raw little-endian bytes; see the module docstring)."""

    prompt_ids: bytes | None = None
    ids: bytes | None = None
    """The completion's token ids."""
    logprobs: bytes | None = None
    """The chosen (completion) tokens' logprobs."""
    top_n: int = 0
    top_ids: bytes | None = None
    top_logprobs: bytes | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (TokenTrace, (self.prompt_ids, self.ids, self.logprobs, self.top_n, self.top_ids, self.top_logprobs))

    @classmethod
    def of(
        cls,
        prompt_ids: Sequence[int] | None = None,
        ids: Sequence[int] | None = None,
        logprobs: Sequence[float] | None = None,
        top_ids: Sequence[Sequence[int]] | None = None,
        top_logprobs: Sequence[Sequence[float]] | None = None,
    ) -> TokenTrace:
        """From lists (top: one row of ``top_n`` per completion token)."""
        top_n = len(top_ids[0]) if top_ids else 0
        flat_ids = [i for row in top_ids for i in row] if top_ids and top_n else None
        flat_lp = [x for row in top_logprobs for x in row] if top_logprobs and top_n else None
        return cls(_pack(prompt_ids, _IDS), _pack(ids, _IDS), _pack(logprobs, _LOGPROBS), top_n, _pack(flat_ids, _IDS), _pack(flat_lp, _LOGPROBS))

    def array(self, name: str) -> np.ndarray | None:
        """One field as a numpy array (``top_*``: ``len(ids) x top_n``), or None."""
        raw = getattr(self, name)
        if raw is None:
            return None
        arr = np.frombuffer(raw, dtype=_DTYPES[name])
        return arr.reshape(-1, self.top_n) if name.startswith("top_") and self.top_n else arr

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {n: None if (raw := getattr(self, n)) is None else base64.b64encode(raw).decode("ascii") for n in _FIELDS}
        out["top_n"] = self.top_n
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenTrace:
        """The inverse of :meth:`to_dict`; a field that is not such base64 raises ValueError naming it."""
        values: dict[str, Any] = {}
        for name in _FIELDS:
            text = d.get(name)
            if text is None:
                values[name] = None
                continue
            try:
                raw = base64.b64decode(text, validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise ValueError(f"tokens.{name}: not base64 text") from None
            if len(raw) % 4:
                raise ValueError(f"tokens.{name}: {len(raw)} bytes is not a whole number of 4-byte values")
            values[name] = raw
        top_n = d.get("top_n") or 0
        if not isinstance(top_n, int) or top_n < 0:
            raise ValueError(f"tokens.top_n: expected an int >= 0, got {top_n!r}")
        for name in ("top_ids", "top_logprobs"):
            if values[name] is not None and (not top_n or len(values[name]) % (4 * top_n)):
                raise ValueError(f"tokens.{name}: {len(values[name]) // 4} values are not rows of top_n={top_n}")
        return cls(values["prompt_ids"], values["ids"], values["logprobs"], top_n, values["top_ids"], values["top_logprobs"])


def expand(d: Any, arrays: bool = False) -> dict[str, Any] | None:
    """A record's ``tokens`` (:meth:`TokenTrace.to_dict`) decoded for an export: lists (JSONL), or numpy
    arrays (``arrays``: Parquet keeps their ``int32``/``float32``); ``top_*`` one row per token.
    A value that does not decode is kept as it was (the export does not drop what the record holds)."""
    if not isinstance(d, dict):
        return d
    try:
        trace = TokenTrace.from_dict(d)
    except ValueError:
        return d
    out: dict[str, Any] = {}
    for name in _FIELDS:
        arr = trace.array(name)
        if arr is None:
            out[name] = None
        elif arr.ndim == 2:
            out[name] = list(arr) if arrays else arr.tolist()
        else:
            out[name] = arr if arrays else arr.tolist()
    return out
