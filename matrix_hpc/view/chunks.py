"""One column of a store part, read chunk by chunk, without loading the array.

zarr's own slicing costs ~0.25 ms per chunk beyond the decode itself (its async
pipeline, per chunk): one column of a million records in 256-row chunks took ~1 s
here, four times the read and decode. The store's arrays are the ones
:class:`~matrix_hpc.store.StoreWriter` creates (1-D, regular chunks, ``vlen-utf8`` or
little-endian ``bytes``, then ``zstd``), so where zarr's metadata says exactly that,
the chunk files (named by zarr's own key encoding) are read and decoded with the same
numcodecs codecs zarr uses; any other layout is read through zarr.

Only committed rows are ever asked for: the writer fsyncs a chunk before it advances
``commit.json`` and replaces a chunk file atomically, so a chunk holding committed
rows always exists and reads whole (old or new version: both hold those rows).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr
from numcodecs import VLenUTF8
from numcodecs.zstd import decompress
from zarr.codecs import BytesCodec, VLenUTF8Codec, ZstdCodec

__all__ = ["Column"]

log = logging.getLogger(__name__)

_Decoder = Callable[[bytes], np.ndarray]


def _fast_decoder(array: zarr.Array) -> _Decoder | None:
    """A decoder of one chunk file's bytes, where the layout is the store writer's; else None."""
    md = array.metadata
    codecs = tuple(getattr(md, "codecs", ()))
    shape = getattr(getattr(md, "chunk_grid", None), "chunk_shape", None)
    if len(codecs) != 2 or not isinstance(codecs[1], ZstdCodec) or shape is None or len(shape) != 1:
        return None
    if isinstance(codecs[0], VLenUTF8Codec):
        vlen = VLenUTF8()
        return lambda raw: vlen.decode(decompress(raw))
    if isinstance(codecs[0], BytesCodec) and str(getattr(codecs[0].endian, "value", codecs[0].endian)) in ("little", "None"):
        dtype = np.dtype(array.dtype).newbyteorder("<")
        if dtype.kind in "iuf":
            return lambda raw: np.frombuffer(decompress(raw), dtype=dtype)
    return None


class Column:
    """Column ``name`` of a part's ``data.zarr``: :meth:`read` rows, :meth:`chunk` one chunk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._open()

    def _open(self) -> None:
        self.array = zarr.open_array(str(self.path), mode="r")
        self.chunk_rows = int(self.array.metadata.chunk_grid.chunk_shape[0])
        self._decode = _fast_decoder(self.array)
        self.text_bytes = self._decode is not None and isinstance(self.array.metadata.codecs[0], VLenUTF8Codec)
        """:meth:`chunk_bytes` works: a string column in the writer's layout."""

    def chunk_bytes(self, k: int) -> bytes | None:
        """Chunk ``k`` of a string column as one buffer: every string's UTF-8 bytes, each after
        a 4-byte length (numcodecs' vlen layout). A search that finds nothing in it can skip
        the chunk without making a string of each element. None: not available (see ``text_bytes``)."""
        if not self.text_bytes:
            return None
        try:
            raw = (self.path / self.array.metadata.encode_chunk_key((k,))).read_bytes()
        except FileNotFoundError:
            return None
        return bytes(decompress(raw))

    def chunk(self, k: int) -> np.ndarray:
        """Every element of chunk ``k`` as stored (rows past the committed ones are not to be trusted)."""
        if self._decode is not None:
            key = self.array.metadata.encode_chunk_key((k,))
            try:
                raw = (self.path / key).read_bytes()
            except FileNotFoundError:  # not written at all: zarr gives the fill value
                pass
            else:
                return self._decode(raw)
        lo, hi = k * self.chunk_rows, (k + 1) * self.chunk_rows
        if hi > self.array.shape[0]:
            self._open()  # the writer grew the array since it was opened
        return np.asarray(self.array[lo : min(hi, self.array.shape[0])], dtype=object if self.array.dtype.kind in "OTU" else None)

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``[lo, hi)``."""
        if hi <= lo:
            return np.empty(0, dtype=object)
        parts = []
        for k in range(lo // self.chunk_rows, (hi - 1) // self.chunk_rows + 1):
            base = k * self.chunk_rows
            data = self.chunk(k)
            parts.append(data[max(lo - base, 0) : hi - base])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
