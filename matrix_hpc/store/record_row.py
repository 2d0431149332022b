"""One record as the store keeps it (:class:`RecordRow`), and the run a writer works for
(:class:`WriterOwner`): the types agent actors build and send, apart from the store so that
they import neither zarr nor numpy (~0.5 s of CPU and ~17 MB in every actor process)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .textsafe import clean_text, record_json

__all__ = ["NUM_COLUMNS", "REPLACES", "STR_COLUMNS", "RecordRow", "WriterOwner"]

REPLACES = "replaces"
"""The column naming the row a retry replaces (see :mod:`.latest`)."""
STR_COLUMNS = ("id", "status", "error_kind", "record")
NUM_COLUMNS = {"finished_at": "float64", "prompt_tokens": "int64", "completion_tokens": "int64", REPLACES: "int64"}


@dataclass(slots=True)
class RecordRow:
    """One record as stored: a few indexed columns plus the full record as JSON."""

    id: str
    status: str
    error_kind: str
    record: str
    finished_at: float
    prompt_tokens: int
    completion_tokens: int
    replaces: int = -1
    """The row of this part whose (failed) record this one replaces: a retry (see :mod:`.latest`)."""

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> RecordRow:
        """The row of ``record``; text UTF-8 cannot encode is replaced and the record says
        so (``text_replaced``, see :mod:`.textsafe`), in the id column too."""
        err = record.get("error") or {}
        usage = record.get("usage") or {}
        return cls(
            id=clean_text(record["id"])[0],
            status=record["status"],
            error_kind=clean_text(err.get("kind", ""))[0],
            record=record_json(record),
            finished_at=float(record.get("finished_at") or time.time()),
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            replaces=int((record.get("retry_of") or {}).get("row", -1)),
        )

    @classmethod
    def bad_record(cls, row: RecordRow, reason: str) -> RecordRow:
        """A failed record (``bad_record``) in place of ``row``, which the store cannot write."""
        rid = clean_text(str(row.id))[0]
        message = f"record {rid!r} cannot be written to the store: {reason}"
        record = {"id": rid, "status": "failed", "error": {"kind": "bad_record", "message": message}, "finished_at": time.time()}
        if row.replaces >= 0:  # still the retry it was: it replaces the same record
            record["retry_of"] = {"row": int(row.replaces)}
        return cls(rid, "failed", "bad_record", record_json(record), record["finished_at"], 0, 0, int(row.replaces))

    def problem(self) -> str | None:
        """Why the store cannot write this row (None: it can): each column is converted as
        :meth:`StoreWriter.write` does. Only asked after a write failed (not per row)."""
        for name in STR_COLUMNS:
            value = getattr(self, name)
            try:
                if not isinstance(value, str):
                    raise TypeError(f"{type(value).__name__} is not a str")
                value.encode("utf-8")  # what zarr's variable-length string codec does
            except (TypeError, ValueError) as exc:
                return f"column {name}: {type(exc).__name__}: {exc}"
        import numpy as np  # only after a write failed

        for name, dtype in NUM_COLUMNS.items():
            try:
                np.array([getattr(self, name)], dtype=dtype)
            except (TypeError, ValueError, OverflowError) as exc:
                return f"column {name}: {type(exc).__name__}: {exc}"
        return None


@dataclass(frozen=True)
class WriterOwner:
    """The run a writer works for, written into its lease (see :class:`WriterLease`)."""

    run_id: str = ""
    driver_host: str = ""
    driver_pid: int = 0
    start_rows: int | None = None
    """Rows of the part committed when the run's life started (None: when the writer opens).
    A failed record before it is one this life may retry: see :meth:`StoreWriter.holds`. A
    restarted sink gets the same value, so its answer does not change with the restart."""
