"""``--where FIELD OP VALUE``: a record filter small enough to read at a glance, with no eval.

* ``FIELD``: a dotted path into the record (``status``, ``error.kind``, ``result.revisions``,
  ``row.id``, ``usage.prompt_tokens``); a part that is a number indexes a list
  (``turns.0.role``).
* ``OP``: ``==`` ``!=`` ``<`` ``<=`` ``>`` ``>=``.
* ``VALUE``: JSON if it parses as JSON (``2``, ``true``, ``null``, ``"e01"``, ``[1, 2]``),
  else the text as written (``status==ok``).

A record whose path does not resolve (a missing key, ``result`` null in a failed record)
matches no condition, ``!=`` included. ``==``/``!=`` compare JSON values (``true`` is not
``1``); the order operators compare two numbers or two strings and match nothing else.
Several conditions are ANDed (the caller's list).
"""

from __future__ import annotations

import json
import logging
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["OPS", "WhereError", "Where", "parse_where"]

log = logging.getLogger(__name__)

OPS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
}
_EXPR = re.compile(r"^\s*(?P<field>[^\s=!<>]+)\s*(?P<op>==|!=|<=|>=|<|>)\s*(?P<value>.*?)\s*$", re.DOTALL)
_MISSING = object()


class WhereError(ValueError):
    """A ``--where`` expression that is not ``FIELD OP VALUE``."""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _same_kind(a: Any, b: Any) -> bool:
    """JSON equality: a boolean equals only a boolean (Python's ``True == 1`` is not JSON's)."""
    return isinstance(a, bool) == isinstance(b, bool)


@dataclass(frozen=True)
class Where:
    """One parsed condition; :meth:`match` tests a record (a JSON object)."""

    text: str
    path: tuple[str, ...]
    op: str
    value: Any

    def lookup(self, rec: Any) -> Any:
        node = rec
        for part in self.path:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return _MISSING
        return node

    def match(self, rec: Any) -> bool:
        got = self.lookup(rec)
        if got is _MISSING:
            return False
        if self.op in ("==", "!="):
            equal = _same_kind(got, self.value) and got == self.value
            return equal if self.op == "==" else not equal
        comparable = (_is_number(got) and _is_number(self.value)) or (isinstance(got, str) and isinstance(self.value, str))
        return comparable and OPS[self.op](got, self.value)


def parse_where(text: str) -> Where:
    """``FIELD OP VALUE`` -> :class:`Where`; a :class:`WhereError` saying what is wrong otherwise."""
    m = _EXPR.match(text)
    if m is None:
        hint = " (to compare, write ==, not =)" if re.search(r"(?<![=!<>])=(?!=)", text) else ""
        raise WhereError(f"--where {text!r}: expected FIELD OP VALUE with OP one of {' '.join(OPS)}, e.g. 'result.revisions==2'{hint}")
    field, op, raw = m.group("field"), m.group("op"), m.group("value")
    path = tuple(field.split("."))
    if any(not p for p in path):
        raise WhereError(f"--where {text!r}: field {field!r} has an empty part (write dotted names like result.revisions)")
    if not raw:
        raise WhereError(f'--where {text!r}: no value after {op!r} (write "" for the empty string)')
    if raw[0] in "=<>!":
        raise WhereError(f"--where {text!r}: operator {op + raw[0]!r} is not one of {' '.join(OPS)}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return Where(text, path, op, value)
