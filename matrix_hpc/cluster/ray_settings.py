"""Ray's own settings for every cluster this project starts (local or on Slurm nodes)."""

from __future__ import annotations

from typing import Any

__all__ = ["RAY_SYSTEM_CONFIG"]

RAY_SYSTEM_CONFIG: dict[str, Any] = {"prestart_worker_first_driver": False}
"""No prestarted workers: Ray starts one idle Python worker per CPU for the first driver's
tasks (~80 MB each, measured), and a run's driver submits no tasks, only actors, whose
workers Ray starts for them."""
