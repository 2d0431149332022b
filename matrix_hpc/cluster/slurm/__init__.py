"""Slurm: per-node bootstrap, rendezvous, Ray node processes, ports, the run's jobs, submitit.

``submit`` is imported lazily: it needs the optional ``slurm`` extra (submitit).
"""

from __future__ import annotations

from typing import Any

__all__ = ["submit"]


def submit(config: str, overrides: list[str] | None = None, executor: Any = None) -> Any:
    """Submit the run in ``config`` through submitit (see :mod:`.submitter`)."""
    from .submitter import submit as _submit

    return _submit(config, overrides, executor)
