"""Checkpointed, resumable output (zarr) and its export to JSONL / Parquet.

The names below are imported on first use: a module that needs only ``store.layout``
(the LLM services, the Slurm bootstrap, credentials) does not pay for zarr and the exporters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_getattr

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


__getattr__ = lazy_getattr(__name__, _HOME, globals())
