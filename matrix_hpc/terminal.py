"""``matrix-hpc show`` and ``sample``: records printed readably in the terminal.

Records are read the way ``matrix-hpc view`` reads them (:class:`~.view.index.StoreIndex`:
committed rows only, no lock, nothing written), so both work on a running job's store.
``show`` prints one record in full: its state, the failure (kind, message, traceback),
each turn's role, model, tokens and latency with the text, then the result. ``sample``
prints a few records shortly, filtered by ``--status`` and ``--where`` (see
:mod:`.store.where`): the first ones in store order (commit order), or a random draw with
``--seed``.

Text from the store (LLM replies, rows) may hold terminal control sequences: they are
printed escaped (``\\x1b``), never sent to the terminal as they are.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["add_parsers", "render_record"]

log = logging.getLogger(__name__)

_SUGGEST_MAX_IDS = 200_000  # "did you mean" compares against every id only up to this many
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_COMPACT_TEXT = 160  # characters of each turn's text (and the result) ``sample`` prints


def _safe(text: Any) -> str:
    """``text`` with control characters (but newline and tab) escaped: a reply cannot move the cursor or recolour the terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def _when(ts: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if isinstance(ts, (int, float)) and ts > 0 else "?"


def _cut(text: str, n: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= n else flat[: n - 1] + "…"


def _json(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent, default=str)


def _indent(text: str, pad: str = "    ") -> str:
    return "\n".join(pad + line for line in text.splitlines()) if text else pad + "(empty)"


def _turn_head(i: int, t: dict[str, Any]) -> str:
    parts = [f"[{i}] {_safe(t.get('role'))}"]
    if t.get("model") is None and t.get("endpoint") is None:
        parts.append("no LLM call")
    else:
        served = t.get("served_model")
        model = _safe(t.get("model")) + (f" ({_safe(served)})" if served and served != t.get("model") else "")
        parts += [f"model {model}", f"{t.get('prompt_tokens') or 0} prompt + {t.get('completion_tokens') or 0} completion tokens"]
        latency = t.get("latency_s")
        parts.append(f"{latency:.2f}s" if isinstance(latency, (int, float)) else "?s")
    if t.get("replayed"):
        parts.append("replayed from the journal")
    if t.get("error"):
        parts.append(f"FAILED {_safe(t['error'])}")
    return " · ".join(parts)


def render_record(rec: dict[str, Any], where: str = "", compact: bool = False) -> str:
    """One record as text: in full (``show``) or in a few lines (``sample``)."""
    turns = [t for t in rec.get("turns") or [] if isinstance(t, dict)]
    usage = rec.get("usage") or {}
    err = rec.get("error") if isinstance(rec.get("error"), dict) else None
    status = rec.get("status")
    head = f"record {_safe(rec.get('id'))}: {_safe(status)}" + (f" {_safe(err.get('kind'))}" if err else "")
    tokens = f"{usage.get('prompt_tokens', 0)} prompt + {usage.get('completion_tokens', 0)} completion tokens"
    calls = f"{len(turns)} turn{'s' if len(turns) != 1 else ''}"
    if compact:
        lines = [f"== {head} · {calls} · {tokens}" + (f" · {where}" if where else "")]
        if err:
            role = f" (role {_safe(err.get('role'))})" if err.get("role") else ""
            lines.append(f"  failed{role}: {_safe(_cut(str(err.get('message') or ''), _COMPACT_TEXT))}")
        for i, t in enumerate(turns, 1):
            text = _cut(str(t.get("text") or ""), _COMPACT_TEXT)
            lines.append(f"  {_turn_head(i, t)}" + (f": {_safe(text)}" if text else ""))
        if rec.get("result") is not None:
            lines.append(f"  result: {_safe(_cut(_json(rec['result']), _COMPACT_TEXT))}")
        return "\n".join(lines)
    lines = [head + (f"   ({where})" if where else "")]
    lines.append(
        f"attempt {rec.get('attempt', '?')} · hops {rec.get('hops', '?')} · created {_when(rec.get('created_at'))} · finished {_when(rec.get('finished_at'))} · {tokens}"
    )
    retry = rec.get("retry_of")
    if isinstance(retry, dict):
        lines.append(f"a retry (run --retry-failed): it replaces the failed record ({_safe(retry.get('error_kind'))}) at row {_safe(retry.get('row'))}")
    if rec.get("text_replaced"):
        lines.append(f"text replaced (not UTF-8): {_safe(_json(rec['text_replaced']))}")
    lines += ["", "row:", _indent(_safe(_json(rec.get("row"), 2)))]
    if err:
        lines += ["", f"failed: {_safe(err.get('kind'))}" + (f" in role {_safe(err.get('role'))}" if err.get("role") else "")]
        lines.append(_indent(_safe(err.get("message") or "")))
        if err.get("traceback"):
            lines += ["traceback:", _indent(_safe("\n".join(map(str, err["traceback"]))))]
    lines += ["", f"dialogue: {calls}"]
    for i, t in enumerate(turns, 1):
        lines += [_turn_head(i, t), _indent(_safe(t.get("text") or ""))]
    if not turns:
        lines.append("    (no turns)")
    lines += ["", "result:", _indent(_safe(_json(rec.get("result"), 2)))]
    return "\n".join(lines)


def _index(output: str) -> Any:
    from .store import StoreReader
    from .view.index import StoreIndex

    StoreReader(output)  # a folder that is no store: one clear line (StoreError)
    ix = StoreIndex(Path(output))
    ix.refresh()
    return ix


def _all_ids(ix: Any) -> list[str]:
    return [rid for part in ix.parts for rid in part.column("id").read(0, part.n).tolist()]


def _not_found(ix: Any, output: str, rid: str) -> str:
    msg = f"no record with id {rid!r} in {output}"
    if ix.n == 0:
        return msg + " (no record is committed yet)"
    if ix.n <= _SUGGEST_MAX_IDS:
        close = difflib.get_close_matches(rid, _all_ids(ix), n=3, cutoff=0.6)
        if close:
            return msg + f" (did you mean {' or '.join(map(repr, close))}?)"
    return msg + f" ({ix.n} records; `matrix-hpc sample {output}` lists some ids)"


def cmd_show(args: argparse.Namespace) -> int:
    ix = _index(args.output)
    hits = ix.find_all(args.id)  # every record of the id; the last is the current one (store.latest)
    if not hits:
        print(f"matrix-hpc: error: {_not_found(ix, args.output, args.id)}", file=sys.stderr)
        return 2
    *earlier, (pi, row) = hits
    if args.history:
        for n, (epi, erow) in enumerate(earlier, 1):
            old = json.loads(ix.record_text(epi, erow))
            print(render_record(old, f"{ix.parts[epi].name} row {erow}, record {n} of {len(hits)} of this id, replaced by a retry") + "\n")
    rec = json.loads(ix.record_text(pi, row))
    print(render_record(rec, f"{ix.parts[pi].name} row {row}, record {ix.offsets()[pi] + row + 1} of {ix.n}"))
    if earlier and not args.history:
        kinds = ", ".join(str((json.loads(ix.record_text(epi, erow)).get("error") or {}).get("kind")) for epi, erow in earlier)
        print(f"\nhistory: {len(earlier)} earlier record(s) of this id, failed ({kinds}) and replaced by retries; --history prints them")
    return 0


def _candidates(ix: Any, status: str | None, seed: int | None) -> Iterator[int]:
    """Global row numbers to read, in the order to read them."""
    import numpy as np

    arrays = ix.arrays()
    rows = np.flatnonzero(arrays["current"])  # records a retry replaced are history, not data
    if status is not None:
        code = ix.status.code(status)
        rows = rows[arrays["status"][rows] == code] if code is not None else rows[:0]
    if seed is not None:
        rows = np.random.default_rng(seed).permutation(rows)
    return (int(g) for g in rows)


def cmd_sample(args: argparse.Namespace) -> int:
    from .store.where import WhereError, parse_where

    try:
        conds = [parse_where(w) for w in args.where]
    except WhereError as exc:
        print(f"matrix-hpc: error: {exc}", file=sys.stderr)
        return 2
    if args.n < 1:
        print(f"matrix-hpc: error: -n {args.n}: give a number of records of at least 1", file=sys.stderr)
        return 2
    ix = _index(args.output)
    shown = 0
    for g in _candidates(ix, args.status, args.seed):
        pi, row = ix.locate(g)
        rec = json.loads(ix.record_text(pi, row))
        if not all(c.match(rec) for c in conds):
            continue
        print(("\n" if shown else "") + render_record(rec, f"{ix.parts[pi].name} row {row}", compact=True))
        shown += 1
        if shown >= args.n:
            break
    filters = ", ".join(([f"status {args.status}"] if args.status else []) + [c.text for c in conds])
    how = f"at random (seed {args.seed})" if args.seed is not None else "first in store order"
    if shown < args.n:
        print(("\n" if shown else "") + f"{'only ' if shown else ''}{shown} of {ix.n} record(s) match" + (f" ({filters})" if filters else ""))
    else:
        print(
            f"\n{shown} record(s) shown, {how}"
            + (f", of those matching {filters}" if filters else "")
            + f"; `matrix-hpc show {args.output} ID` prints one in full"
        )
    return 0


def add_parsers(sub: Any) -> None:
    """The ``show`` and ``sample`` subcommands, on the CLI's subparsers."""
    sh = sub.add_parser(
        "show",
        help="print one record: its dialogue (each turn's role, model, tokens, latency, text), failure and result",
        description="Print one committed record readably: state, input row, the failure (kind, message, traceback), each turn's role, model, tokens and latency followed by its text, and the result. Works while the run writes. An unknown id exits 2.",
    )
    sh.add_argument("output", help="output folder (output.path of the run)")
    sh.add_argument("id", help="the record's id (the dataset row's id field, as `sample` and `export` show it)")
    sh.add_argument("--history", action="store_true", help="also print the id's earlier records: failed ones that retries (run --retry-failed) replaced")
    sh.set_defaults(func=cmd_show)

    sa = sub.add_parser(
        "sample",
        help="print a few records shortly, filtered by --status and --where",
        description=(
            "Print a few committed records, a few lines each. Without --seed: the first matching records in store order (the order they were committed); "
            "with --seed N: a random draw, the same for the same N. "
            "--where FIELD OP VALUE: FIELD a dotted path into the record (result.revisions, error.kind, row.id, turns.0.role), "
            'OP one of == != < <= > >=, VALUE parsed as JSON (2, true, null, "x") or else taken as text; '
            "a record without the field matches nothing; several --where must all hold. A malformed expression exits 2."
        ),
    )
    sa.add_argument("output", help="output folder (output.path of the run)")
    sa.add_argument("-n", type=int, default=5, help="how many records (default 5)")
    sa.add_argument("--status", choices=["ok", "failed"], help="only records with this status")
    sa.add_argument(
        "--where", action="append", default=[], metavar="EXPR", help="e.g. 'result.revisions==2' or 'error.kind==agent_error' (repeatable: all must hold)"
    )
    sa.add_argument("--seed", type=int, help="draw at random with this seed (default: the first records in store order)")
    sa.set_defaults(func=cmd_sample)
