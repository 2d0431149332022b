"""Names a package imports on first use (PEP 562's module ``__getattr__``).

A package whose ``__init__`` imported all its names made every importer pay for all of them:
``status`` paid for aiohttp through ``services.llm``, agent actors for zarr through ``store``.
Standard library only, so any layer may use it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_getattr"]


def lazy_getattr(package: str, homes: dict[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports ``name`` from its relative module
    ``homes[name]`` on first use and keeps it in ``namespace`` (the package's globals)."""

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home, package), name)
        namespace[name] = value
        return value

    return __getattr__
