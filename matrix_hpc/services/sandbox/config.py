"""The pool's typed settings, built from a workflow's ``sandbox:`` mapping.

:func:`pool_config` rejects unknown keys and wrong types with a
:class:`SandboxConfigError` naming the dotted key (``sandbox.limits.wall_s: ...``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from .apptainer import ApptainerOptions, ApptainerRuntime
from .base import SandboxLimits, SandboxRuntime
from .bubblewrap import BubblewrapOptions, BubblewrapRuntime

__all__ = ["PoolConfig", "SandboxConfigError", "make_runtime", "pool_config"]


class SandboxConfigError(ValueError):
    """A sandbox setting is wrong; the message names the key."""


@dataclass
class PoolConfig:
    runtime: Literal["bubblewrap", "apptainer"] = "bubblewrap"
    size: int = 4
    """Warm sandboxes kept by the pool."""
    max_uses: int = 100
    """Leases a sandbox serves before it is destroyed and a fresh one made."""
    max_waiting: int = 10_000
    """Callers allowed to wait for a sandbox at once; more are refused at once (backpressure)."""
    lease_ttl_s: float = 900.0
    """A lease older than this is reclaimed even if its holder looks alive (backstop)."""
    liveness_interval_s: float = 1.0
    """How often holders of leases are checked; dead holders' sandboxes are reclaimed."""
    idle_exit_s: float | None = 600.0
    """A pool with no lease and no call for this long exits (detached pools must not outlive a run)."""
    root_dir: str | None = None
    """Where private sandbox directories live (default: $TMPDIR/matrix-hpc-sandboxes)."""
    limits: SandboxLimits = field(default_factory=SandboxLimits)
    """Default per-exec limits; an exec may pass its own."""
    bubblewrap: BubblewrapOptions = field(default_factory=BubblewrapOptions)
    apptainer: ApptainerOptions = field(default_factory=ApptainerOptions)

    def __post_init__(self) -> None:
        for name in ("size", "max_uses", "max_waiting"):
            if getattr(self, name) < 1:
                raise SandboxConfigError(f"sandbox.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("lease_ttl_s", "liveness_interval_s"):
            if getattr(self, name) <= 0:
                raise SandboxConfigError(f"sandbox.{name}: must be > 0, got {getattr(self, name)}")


def make_runtime(cfg: PoolConfig) -> SandboxRuntime:
    """The configured runtime, checked: :class:`RuntimeNotInstalled` if its binary is missing."""
    runtime: SandboxRuntime
    if cfg.runtime == "bubblewrap":
        runtime = BubblewrapRuntime(cfg.bubblewrap)
    else:
        runtime = ApptainerRuntime(cfg.apptainer)
    runtime.check()
    return runtime


def pool_config(data: dict[str, Any] | PoolConfig | None, key: str = "sandbox") -> PoolConfig:
    """Build a :class:`PoolConfig` from plain (YAML) data."""
    if isinstance(data, PoolConfig):
        return data
    return typing.cast(PoolConfig, _build(PoolConfig, data or {}, key))


def _build(tp: Any, value: Any, key: str) -> Any:
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SandboxConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp)]
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise SandboxConfigError(f"unknown key {key}.{unknown[0]} (expected one of: {', '.join(names)})")
        try:
            return tp(**{k: _build(hints[k], v, f"{key}.{k}") for k, v in value.items()})
        except ValueError as exc:
            if isinstance(exc, SandboxConfigError):
                raise
            raise SandboxConfigError(f"{key}: {exc}") from None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _build(inner, value, key)
    if origin is Literal:
        if value not in args:
            raise SandboxConfigError(f"{key}: expected one of {', '.join(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise SandboxConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [_build(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SandboxConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return {str(k): _build(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and type(value) is not tp:
        raise SandboxConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value
