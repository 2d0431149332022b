"""The pool's typed settings (defined with the job spec in :mod:`matrix_hpc.config.sandbox`) and its runtime.

:func:`pool_config` builds them with the job spec's one builder and rejects unknown
keys and wrong types with a :class:`SandboxConfigError` naming the dotted key
(``sandbox.limits.wall_s: ...``).
"""

from __future__ import annotations

from ...config.sandbox import PoolConfig, SandboxConfigError, pool_config
from .apptainer import ApptainerRuntime
from .base import SandboxRuntime
from .bubblewrap import BubblewrapRuntime

__all__ = ["PoolConfig", "SandboxConfigError", "make_runtime", "pool_config"]


def make_runtime(cfg: PoolConfig) -> SandboxRuntime:
    """The configured runtime, checked: :class:`RuntimeNotInstalled` if its binary is missing."""
    runtime: SandboxRuntime
    if cfg.runtime == "bubblewrap":
        runtime = BubblewrapRuntime(cfg.bubblewrap)
    else:
        runtime = ApptainerRuntime(cfg.apptainer)
    runtime.check()
    return runtime
