"""Checkpointed, resumable output (zarr) and its export to JSONL / Parquet.

The names below are imported on first use: a module that needs only ``store.layout``
(the LLM services, the Slurm bootstrap, credentials) does not pay for zarr and the exporters.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .export import export_store
    from .fsutil import StoreLockedError
    from .record_row import RecordRow
    from .zarr_store import StoreError, StoreReader, StoreWriter

__all__ = ["RecordRow", "StoreError", "StoreLockedError", "StoreReader", "StoreWriter", "export_store"]

_HOME = {
    "export_store": ".export",
    "StoreLockedError": ".fsutil",
    "RecordRow": ".record_row",
    "StoreError": ".zarr_store",
    "StoreReader": ".zarr_store",
    "StoreWriter": ".zarr_store",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value
