"""Checkpointed, resumable output (zarr) and its export to JSONL / Parquet."""

from .export import export_store
from .fsutil import StoreLockedError
from .zarr_store import RecordRow, StoreError, StoreReader, StoreWriter

__all__ = ["RecordRow", "StoreError", "StoreLockedError", "StoreReader", "StoreWriter", "export_store"]
