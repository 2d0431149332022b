"""``matrix-hpc view``: a local web viewer of a run's records, live while the run writes.

Layers: :mod:`.chunks` (a column read chunk by chunk), :mod:`.index` (the committed rows'
small columns and per-record facets), :mod:`.query` (the records table), :mod:`.runpage`
(the run page's data), :mod:`.server` (aiohttp: the guard, the API, the static page in
``static/``). It imports the store and the status helpers; nothing lower imports it.
"""

from .server import serve_view

__all__ = ["serve_view"]
