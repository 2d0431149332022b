"""The ``sandbox:`` section: the typed settings of a node's sandbox pool.

Plain data (no runtime code) so the job spec can hold it; the runtimes and the
pool in :mod:`matrix_hpc.services.sandbox` take these objects as they are.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from .build import ConfigError, build

__all__ = ["ApptainerOptions", "BubblewrapOptions", "PoolConfig", "SandboxConfigError", "SandboxLimits", "pool_config"]

NOBODY = 65534


class SandboxConfigError(ConfigError):
    """A sandbox setting is wrong; the message names the key."""


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    """Per-exec limits. ``cpu_s=None`` means the wall limit; sizes are MiB."""

    wall_s: float = 30.0
    cpu_s: float | None = None
    memory_mb: int = 1024  # address space (RLIMIT_AS), not resident memory
    fsize_mb: int = 64  # largest file a process may write
    tmpfs_mb: int = 64  # size of the exec's private /tmp
    nproc: int = 64  # processes + threads inside one sandbox
    output_kb: int = 1024  # per stream; an exec printing more is killed

    def __post_init__(self) -> None:
        for name in ("wall_s", "memory_mb", "fsize_mb", "tmpfs_mb", "nproc", "output_kb"):
            if getattr(self, name) <= 0:
                raise ValueError(f"sandbox limit {name} must be > 0, got {getattr(self, name)!r}")
        if self.cpu_s is not None and self.cpu_s <= 0:
            raise ValueError(f"sandbox limit cpu_s must be > 0, got {self.cpu_s!r}")

    @property
    def cpu_seconds(self) -> int:
        return max(1, round(self.cpu_s if self.cpu_s is not None else self.wall_s))


@dataclass
class BubblewrapOptions:
    """Runtime settings; binds are ``src[:dst]`` host paths.

    ``uid``: who runs the sandbox when the pool runs as root. Root is exempt from
    RLIMIT_NPROC, so as root the sandbox runs as ``uid`` (default nobody), or a
    fork bomb would not be contained.
    """

    uid: int = NOBODY
    network: bool = False
    ro_binds: list[str] = field(default_factory=list)
    rw_binds: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=lambda: {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"})


@dataclass
class ApptainerOptions:
    """``image``: the sandbox SIF (see containers/). ``binds``: ``src:dst[:ro]`` specs."""

    image: str = ""
    network: bool = False
    binds: list[str] = field(default_factory=list)
    instance_args: list[str] = field(default_factory=list)  # e.g. ["--pids-limit", "256"] where cgroups allow
    env: dict[str, str] = field(default_factory=lambda: {"LANG": "C.UTF-8"})


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
    """Where private sandbox directories live (default: $TMPDIR/matrix-hpc-sandboxes), shared by
    the node's users: each gets ``u<uid>/`` (0700) in it, each pool ``pool-<pid>-<token>/``."""
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


def pool_config(data: dict[str, Any] | PoolConfig | None, key: str = "sandbox") -> PoolConfig:
    """Build a :class:`PoolConfig` from plain (YAML) data with the job spec's builder."""
    if isinstance(data, PoolConfig):
        return data
    try:
        return typing.cast(PoolConfig, build(PoolConfig, data or {}, key))
    except SandboxConfigError:
        raise
    except ConfigError as exc:
        raise SandboxConfigError(str(exc)) from None
