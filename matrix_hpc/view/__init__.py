"""``matrix-hpc view``: a local web viewer of a run's records, live while the run writes.

Layers: :mod:`.chunks` (a column read chunk by chunk), :mod:`.index` (the committed rows'
small columns and per-record facets), :mod:`.query` (the records table), :mod:`.runpage`
(the run page's data), :mod:`.server` (aiohttp: the guard, the API, the static page in
``static/``). It imports the store and the status helpers; nothing lower imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_getattr

if TYPE_CHECKING:
    from .server import serve_view

__all__ = ["serve_view"]

# ``serve_view`` on first use: ``show`` and ``sample`` read the index without aiohttp.
__getattr__ = lazy_getattr(__name__, {"serve_view": ".server"}, globals())
