"""Hostile datasets for the intake: rows as scrapers and pipelines really write them.

:func:`hostile_jsonl` and :func:`hostile_parquet` write a file and return what the
source must make of it: a :class:`Case` per row (or unreadable line) saying where it
is, how it ends (ok, or failed with the start of its reason) and, for an ok row,
the row exactly as it must arrive. Rows are shaped for the collab_reasoning workflow
(``question``, ``choices``, ``answer``), so an end-to-end run can take them, and each
object row carries a ``tag`` (unique but in a row repeated on purpose).

The policies the expectations encode (see ``matrix_hpc/runtime/source.py``):
invalid UTF-8 travels as surrogate escapes and the record replaces it (``replaced``);
a BOM and CRLF endings are dropped; raw control characters inside strings are kept;
``NaN``/``Infinity`` stay floats; rows nested more than 100 levels deep or over
``dataset.max_row_bytes`` fail; a repeated id fails as ``ID#dup@lineN``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["Case", "Hostile", "hostile_jsonl", "hostile_parquet", "odd_id_parquet", "MAX_ROW_BYTES", "replaced"]

MAX_ROW_BYTES = 65536  # dataset.max_row_bytes's default, which the expectations assume
BIG = 3_000_000  # characters of the multi-megabyte row
_SURROGATE = re.compile("[\ud800-\udfff]")
_EPOCH = datetime(1970, 1, 1)  # ts 0, as pyarrow gives it


@dataclass
class Case:
    where: str
    """``line N`` (JSONL) or ``row N`` (Parquet): what a failure's reason starts with."""
    status: str
    """``ok`` or ``failed``."""
    id: str | None
    """The record's id; None: a content hash (``h`` + 20 hex digits)."""
    reason: str | None = None
    """failed: the error message starts with this (``where: ...``)."""
    row: Any = None
    """ok: the row exactly as the task carries it."""
    replaced: bool = False
    """ok, and the row holds text UTF-8 cannot encode: the record replaces it and says so."""


@dataclass
class Hostile:
    path: Path
    rows: int
    """What ``count_rows`` must say: non-blank lines, or Parquet rows."""
    cases: list[Case] = field(default_factory=list)


def replaced(value: Any) -> Any:
    """``value`` with text UTF-8 cannot encode replaced by U+FFFD, as the store keeps it."""
    return json.loads(_SURROGATE.sub("\ufffd", json.dumps(value, ensure_ascii=False, default=str)))


def _q(tag: str, rid: Any = ..., **extra: Any) -> dict[str, Any]:
    row = {} if rid is ... else {"id": rid}
    return {**row, "tag": tag, "question": f"Is {tag} a fine row?", "choices": ["yes", "no"], "answer": "A", **extra}


def _nest(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = [value]
    return value


class _Lines:
    """JSONL lines as bytes, each with what the source must make of it."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.cases: list[Case] = []
        self.rows = 0

    def add(self, raw: bytes, ending: bytes = b"\n") -> str:
        self.data.append(raw + ending)
        where = f"line {len(self.data)}"
        if raw.replace(b"\xef\xbb\xbf", b"").strip():
            self.rows += 1
        return where

    def ok(
        self,
        row: dict[str, Any],
        rid: str | None,
        raw: bytes | None = None,
        ending: bytes = b"\n",
        replaced: bool = False,
        as_row: dict[str, Any] | None = None,
    ) -> None:
        where = self.add(raw if raw is not None else json.dumps(row, ensure_ascii=False).encode(), ending)
        self.cases.append(Case(where, "ok", rid, row=row if as_row is None else as_row, replaced=replaced))

    def failed(self, raw: bytes, rid: str | None, reason: str, ending: bytes = b"\n") -> str:
        where = self.add(raw, ending)
        self.cases.append(Case(where, "failed", rid, reason=f"{where}: {reason}"))
        return where


def hostile_jsonl(path: Path, huge_line: bool = False) -> Hostile:
    """About 40 lines of everything that goes wrong in real JSONL. ``huge_line`` adds a
    17 MiB line, more than the source holds in memory (for unit tests)."""
    L = _Lines()
    bom = _q("bom", "bom")
    L.ok(bom, "bom", raw=b"\xef\xbb\xbf" + json.dumps(bom).encode(), ending=b"\r\n")  # the first row after a BOM
    L.ok(_q("crlf", "crlf"), "crlf", ending=b"\r\n")
    L.add(b"", b"\r\n")  # blank lines: skipped, never counted
    L.add(b"  \t ")
    L.ok(_q("utf8", "utf8", question="Which is naïve: café, 東京 or 🙂?"), "utf8")  # raw non-ASCII
    L.ok(_q("u2028", "u2028", note="a\u2028b\u0085c\u2029"), "u2028")  # Unicode line breaks inside a string: one line
    # Invalid UTF-8 (Latin-1 text in a UTF-8 file): ok, the record replaces and says so.
    latin = b'{"id": "latin1", "tag": "latin1", "question": "Is caf\xe9 cr\xe8me a fine row?", "choices": ["yes", "no"], "answer": "A"}'
    L.ok(_q("latin1", "latin1", question="Is caf\udce9 cr\udce8me a fine row?"), "latin1", raw=latin, replaced=True)
    bad_id = b'{"id": "id-\xff", "tag": "bad-id", "question": "Is bad-id a fine row?", "choices": ["yes", "no"], "answer": "A"}'
    L.ok(_q("bad-id", "id-\udcff"), "id-\\xff", raw=bad_id, replaced=True)  # the id: \xff written out
    L.ok(_q("lone", "lone", note="half an emoji \ud83d"), "lone", raw=json.dumps(_q("lone", "lone", note="half an emoji \ud83d")).encode(), replaced=True)
    L.ok(_q("ctl-escaped", "ctl-escaped", note="a\u0000b\u001bc\u007f"), "ctl-escaped")  # escaped: valid JSON
    raw_ctl = b'{"id": "ctl-raw", "tag": "ctl-raw", "question": "Is ctl-raw a fine row?", "choices": ["yes", "no"], "answer": "A", "note": "tab\there NUL\x00 ESC\x1b"}'
    L.ok(_q("ctl-raw", "ctl-raw", note="tab\there NUL\x00 ESC\x1b"), "ctl-raw", raw=raw_ctl)  # raw inside a string: kept
    nan = _q("nan", "nan", score=float("nan"), hi=float("inf"), lo=float("-inf"))
    L.ok(nan, "nan")  # json.dumps writes NaN / Infinity / -Infinity
    L.failed(b"\x00" * 64, None, "invalid JSON")  # a crash's zero-filled tail
    big = json.dumps(_q("big", "big", question="x" * BIG)).encode()
    L.failed(big, "big", f"row big is {len(big)} bytes, over dataset.max_row_bytes={MAX_ROW_BYTES}")
    L.failed(json.dumps(_q("deep", "deep", nest=_nest(200))).encode(), "deep", "row deep is nested more than 100 levels deep")
    L.ok(_q("deep-ok", "deep-ok", nest=_nest(30)), "deep-ok")
    L.failed(b"[" * 5000 + b"]" * 5000, None, "nested too deep to parse")
    L.failed(b"[1, 2, 3]", None, "expected a JSON object, got an array")
    L.failed(b'"just a string"', None, "expected a JSON object, got a string")
    L.failed(b"42", None, "expected a JSON object, got a number")
    L.failed(b"null", None, "expected a JSON object, got null")
    L.failed(b'{"id": "trunc", "tag": "trunc", "question": "cut of', None, "invalid JSON")
    L.failed(json.dumps(_q("extra", "extra")).encode() + b" }", None, "invalid JSON (Extra data")
    L.ok(_q("num", 7), "7")  # a numeric id: its text; the row keeps the number
    L.ok(_q("float-id", 8.0), "8")  # pandas' int column with a gap is float64
    L.ok(_q("null-id", None), None)  # null, empty or bool: a content hash
    L.ok(_q("empty-id", ""), None)
    L.ok(_q("bool-id", True), None)
    L.ok(_q("no-id"), None)
    num_line = next(c.where for c in L.cases if c.id == "7")
    dup = f"crlf#dup@line{len(L.data) + 1}"
    dup_line = L.failed(json.dumps(_q("crlf-again", "crlf")).encode(), dup, "duplicate id 'crlf' (first at line 2)")
    L.failed(json.dumps(_q("num-again", "7")).encode(), f"7#dup@line{len(L.data) + 1}", f"duplicate id '7' (first at {num_line})")
    L.failed(json.dumps(_q("no-id")).encode(), None, "duplicate id 'h")  # the same content again
    L.failed(b"\x00" * 64, None, "invalid JSON (Expecting value: line 1 column 1 (char 0)); duplicate id 'h")
    # A row's own id that looks like one the source makes: a duplicate of that row too.
    L.failed(json.dumps(_q("own-dup", dup)).encode(), f"{dup}#dup@line{len(L.data) + 1}", f"duplicate id '{dup}' (first at {dup_line})")
    L.failed(json.dumps(_q("no-question", "no-question", question="")).encode(), "no-question", "row no-question is missing required field 'question'")
    L.add(b"\xef\xbb\xbf")  # a BOM alone: blank
    mid = _q("bom-mid", "bom-mid")
    L.ok(mid, "bom-mid", raw=b"\xef\xbb\xbf" + json.dumps(mid).encode())  # files joined with cat
    if huge_line:
        size = (1 << 24) + 1000
        L.failed(b'{"id": "huge", "question": "' + b"y" * (size - 30) + b'"}', None, f"line is {size} bytes, over dataset.max_row_bytes={MAX_ROW_BYTES}")
    L.ok(_q("no-eol", "no-eol"), "no-eol", ending=b"")  # the last line has no newline
    path.write_bytes(b"".join(L.data))
    return Hostile(path, L.rows, L.cases)


def hostile_parquet(path: Path) -> Hostile:
    """32 rows in row groups of 8 (zstd), the third group's ``question`` pages corrupted:
    invalid UTF-8 in string cells (a lone surrogate's CESU bytes too: Arrow cannot hold
    the code point itself), NUL and control characters, non-ASCII, NaN/Infinity, null,
    empty and duplicate ids, a multi-megabyte value, 30-deep lists (about as deep as a
    Parquet reader takes), a timestamp Python cannot hold and a row missing a field."""
    rows: list[dict[str, Any]] = []
    cases: list[Case] = []

    def add(tag: str, rid: Any, status: str, case_id: str | None, reason: str | None = None, replaced: bool = False, **cells: Any) -> None:
        row = {
            "id": rid,
            "tag": tag,
            "question": f"Is {tag} a fine row?",
            "choices": ["yes", "no"],
            "answer": "A",
            "score": 0.5,
            "nest": None,
            "ts": 0,
            **cells,
        }
        rows.append(row)
        where = f"row {len(rows)}"
        expect = None
        if status == "ok":  # as the task carries it: bytes decoded with surrogateescape
            expect = {k: v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v for k, v in row.items()}
            expect["ts"] = _EPOCH
        cases.append(Case(where, status, case_id, reason=f"{where}: {reason}" if reason else None, row=expect, replaced=replaced))

    add("p-plain", "p-plain", "ok", "p-plain")
    add("p-utf8", "p-utf8", "ok", "p-utf8", question="Which is naïve: café, 東京 or 🙂?")
    add("p-latin1", "p-latin1", "ok", "p-latin1", replaced=True, question=b"Is caf\xe9 cr\xe8me a fine row?")
    add("p-bad-id", b"p-id-\xff", "ok", "p-id-\\xff", replaced=True)
    add("p-cesu", "p-cesu", "ok", "p-cesu", replaced=True, question=b"half an emoji \xed\xa0\xbd")
    add("p-ctl", "p-ctl", "ok", "p-ctl", question="tab\there NUL\x00 ESC\x1b DEL\x7f")
    add("p-nan", "p-nan", "ok", "p-nan", score=float("nan"))
    add("p-inf", "p-inf", "ok", "p-inf", score=float("inf"))
    # group 1
    add("p-ninf", "p-ninf", "ok", "p-ninf", score=float("-inf"))
    add("p-null-id", None, "ok", None)
    add("p-empty-id", "", "ok", None)
    add("p-dup", "p-plain", "failed", "p-plain#dup@row12", "duplicate id 'p-plain' (first at row 1)")
    add("p-big", "p-big", "failed", "p-big", "row p-big is ", question="x" * BIG)
    add("p-deep", "p-deep", "ok", "p-deep", nest=_nest(30))
    add("p-ts", "p-ts", "failed", "p-ts", "cannot read column 'ts' (OverflowError", ts=10**15)
    add("p-no-question", "p-no-question", "failed", "p-no-question", "row p-no-question is missing required field 'question'", question=None)
    # group 2: its question pages are corrupted below, so no cell of it can be read
    for i in range(8):
        add(f"p-lost-{i}", f"p-lost-{i}", "failed", None, "unreadable row group 2")
    # group 3
    add("p-after", "p-after", "ok", "p-after")
    add("p-null-id", None, "failed", None, "duplicate id 'h")  # the same content as row 10
    add("p-utf8-2", "p-東京", "ok", "p-東京")
    for i in range(5):
        add(f"p-tail-{i}", f"p-tail-{i}", "ok", f"p-tail-{i}")
    assert len(rows) == 32, len(rows)

    def strings(name: str) -> pa.Array:
        vals = [r[name] if r[name] is None or isinstance(r[name], bytes) else r[name].encode() for r in rows]
        return pa.array(vals, type=pa.binary()).view(pa.string())  # unvalidated: invalid UTF-8 stays

    table = pa.table({
        "id": strings("id"),
        "tag": strings("tag"),
        "question": strings("question"),
        "choices": pa.array([r["choices"] for r in rows], type=pa.list_(pa.string())),
        "answer": strings("answer"),
        "score": pa.array([r["score"] for r in rows], type=pa.float64()),
        "nest": pa.array([r["nest"] for r in rows], type=_list_type(30)),
        "ts": pa.array([r["ts"] for r in rows], type=pa.timestamp("s")),
    })  # fmt: skip
    pq.write_table(table, path, row_group_size=8, compression="zstd")
    _corrupt(path, group=2, column="question")
    return Hostile(path, len(rows), cases)


def odd_id_parquet(path: Path) -> Hostile:
    """Numeric ids as pandas writes them: float64 with a gap (NaN), a repeat, a fraction."""
    ids = [1.0, 2.0, float("nan"), 2.0, 1.5, None]
    rows = [{"id": rid, "tag": f"f{i}", "question": f"Is f{i} a fine row?", "choices": ["yes", "no"], "answer": "A"} for i, rid in enumerate(ids)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    cases = [
        Case("row 1", "ok", "1", row=rows[0]),
        Case("row 2", "ok", "2", row=rows[1]),
        Case("row 3", "ok", None, row=rows[2]),
        Case("row 4", "failed", "2#dup@row4", reason="row 4: duplicate id '2' (first at row 2)"),
        Case("row 5", "ok", "1.5", row=rows[4]),
        Case("row 6", "ok", None, row=rows[5]),
    ]
    return Hostile(path, len(rows), cases)


def _list_type(depth: int) -> pa.DataType:
    t: pa.DataType = pa.string()
    for _ in range(depth):
        t = pa.list_(t)
    return t


def _corrupt(path: Path, group: int, column: str) -> None:
    """Overwrite the middle of one column chunk: its pages no longer decompress."""
    md = pq.ParquetFile(path).metadata
    names = [md.schema.column(i).path for i in range(md.num_columns)]
    chunk = md.row_group(group).column(names.index(column))
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    size = chunk.total_compressed_size
    with open(path, "r+b") as fh:
        fh.seek(start + size // 4)
        fh.write(b"\xff" * max(8, size // 2))
