"""Text that cannot become UTF-8: the one place its policy lives.

A Python string may hold code points that UTF-8 cannot encode: lone surrogates
(U+D800..U+DFFF). ``json.loads`` makes one from ``"\\ud83d"`` (half an emoji, common in
scraped web text and in model replies), and a line decoded with
``errors="surrogateescape"`` carries each invalid byte as U+DC80..U+DCFF. Encoding
such a string raises ``UnicodeEncodeError``, which once stopped a whole run.

Policy: **replace and record.** In a record (what the store keeps and exports) each
such code point becomes U+FFFD, and the record gains one top-level field::

    "text_replaced": {"count": 3, "at": ["row.text", "turns[1].content"]}

(``count`` code points replaced; ``at``: where, as paths into the record, at most
:data:`MAX_PATHS`). A surrogate pair held as two code points is replaced too (two
U+FFFD): ``json.loads`` already joins a well-formed ``"\\ud83d\\ude00"``.

The call journal is not output: it must replay a reply exactly as it came, so
:func:`json_bytes` escapes such code points (``\\ud83d``, which ``json.loads`` turns
back into the same string) and the record made from the replayed reply is replaced
and recorded as the first one was.

Both encoders try the strict encode first and clean only when it fails, so text
that is fine (all of it, nearly always) costs one ``isascii`` or one ``encode``.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

__all__ = ["FIELD", "MAX_PATHS", "REPLACEMENT", "clean", "clean_text", "encodable", "json_bytes", "record_json"]

REPLACEMENT = "\ufffd"
FIELD = "text_replaced"
"""The record field that says what was replaced."""
MAX_PATHS = 8
"""At most this many paths in ``text_replaced.at`` (the count is always whole)."""

_BAD = re.compile("[\ud800-\udfff]")


def encodable(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (``isascii`` is O(1) in CPython: the common case is free)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def clean_text(text: str) -> tuple[str, int]:
    """``text`` with every code point UTF-8 cannot encode replaced by U+FFFD, and how many."""
    if encodable(text):
        return text, 0
    return _BAD.subn(REPLACEMENT, text)


class _Cleaner:
    def __init__(self) -> None:
        self.count = 0
        self.at: list[str] = []

    def text(self, s: str, where: str) -> str:
        new, n = clean_text(s)
        if n:
            self.count += n
            if len(self.at) < MAX_PATHS:
                self.at.append(where or "$")
        return new

    def value(self, v: Any, where: str) -> Any:
        """``v`` itself when nothing in it changes (no copy), else a cleaned copy."""
        if isinstance(v, str):
            return self.text(v, where)
        if isinstance(v, dict):
            out: dict[Any, Any] | None = None
            for i, (k, x) in enumerate(v.items()):
                key = k
                if isinstance(k, str):
                    key, n = clean_text(k)
                    if n:  # the path names the cleaned key: ``at`` itself must encode
                        self.text(k, f"{where}.{key}" if where else key)
                new = self.value(x, f"{where}.{key}" if where else str(key))
                if out is None and (key is not k or new is not x):
                    out = dict(itertools.islice(v.items(), i))
                if out is not None:
                    out[key] = new
            return v if out is None else out
        if isinstance(v, (list, tuple)):
            items = [self.value(x, f"{where}[{i}]") for i, x in enumerate(v)]
            return v if all(a is b for a, b in zip(items, v)) else items
        return v


def clean(value: Any) -> tuple[Any, int, list[str]]:
    """``value`` (JSON-like: dicts, lists, strings) with unencodable text replaced (keys
    included), the count and where (at most :data:`MAX_PATHS` paths). Copy on write:
    ``value`` itself comes back when nothing was replaced, and it is never changed."""
    if _fine(value):  # the common case: one pass, no paths built, no copy
        return value, 0, []
    c = _Cleaner()
    out = c.value(value, "")
    return out, c.count, c.at


def _fine(v: Any) -> bool:
    if type(v) is str:
        return v.isascii() or encodable(v)
    if isinstance(v, dict):
        for k, x in v.items():
            if type(k) is str and not (k.isascii() or encodable(k)):
                return False
            if type(x) is str:
                if not (x.isascii() or encodable(x)):
                    return False
            elif not _fine(x):
                return False
        return True
    if isinstance(v, (list, tuple)):
        for x in v:
            if not _fine(x):
                return False
        return True
    return not isinstance(v, str) or encodable(v)  # a str subclass


def record_json(record: dict[str, Any]) -> str:
    """JSON text of a record that is sure to encode as UTF-8 (the policy above).

    Values JSON cannot encode are written as ``str(value)``, as before."""
    text = json.dumps(record, ensure_ascii=False, default=str)
    if encodable(text):
        return text
    cleaned, count, at = clean(record)
    cleaned = dict(cleaned)  # the caller's record is not changed, even when only str() values were to blame
    cleaned[FIELD] = {"count": count, "at": at}
    text = json.dumps(cleaned, ensure_ascii=False, default=str)
    if not encodable(text):  # in the str() of a value JSON cannot encode: replace it in the text
        n = len(_BAD.findall(text))
        cleaned[FIELD] = {"count": count + n, "at": [*at, "(a value written as text)"][:MAX_PATHS]}
        text = _BAD.sub(REPLACEMENT, json.dumps(cleaned, ensure_ascii=False, default=str))
    return text


def json_bytes(obj: Any) -> bytes:
    """Compact UTF-8 JSON of ``obj`` that decodes back to the same strings: text UTF-8
    cannot encode is written as ``\\uXXXX`` escapes (lossless, for the call journal)."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode("ascii")
