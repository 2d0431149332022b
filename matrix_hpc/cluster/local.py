"""A Ray cluster for one run: a private local one, or an existing one by address."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import ray

from ..config import ClusterConfig
from ..credentials import new_secret
from ..labels import node_resources
from ..stopsignals import handlers_kept
from .auth import RayAuth, loopback_only
from .ray_settings import RAY_SYSTEM_CONFIG, lean_head

__all__ = ["RayCluster", "start_ray"]

log = logging.getLogger(__name__)


@dataclass
class RayCluster:
    namespace: str
    address: str
    started_here: bool
    session_dir: str | None = None
    """Ray's folder for this cluster: ``logs/`` holds every actor's output."""
    auth: RayAuth | None = None
    """The token this process put in its environment for a cluster it started (restored at shutdown)."""

    def shutdown(self) -> None:
        if ray.is_initialized():
            ray.shutdown()
        if self.auth is not None:
            self.auth.restore()
            self.auth = None


def start_ray(cfg: ClusterConfig, namespace: str, python_path: list[str] | None = None) -> RayCluster:
    """Start (or join) Ray. Actor logs stay in Ray's session folder, not on the terminal.

    ``python_path`` folders go on the import path of every worker on every node (they
    must be on a filesystem every node sees, as a workflow folder on a cluster is).
    """
    # A local cluster is reachable by every user of this machine (loopback included): a fresh
    # token, in the environment of this process and so of every Ray process it starts (never
    # in a file), and every server on loopback. Joining ``cluster.address``: Ray reads the
    # cluster's token as it always does (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token).
    auth = RayAuth(token=new_secret()) if cfg.address is None else None
    try:
        # ray.init installs its own SIGTERM handler (which exits at once): the caller's stay.
        with (
            handlers_kept(),
            loopback_only() if cfg.address is None else contextlib.nullcontext(),
            lean_head() if cfg.address is None else contextlib.nullcontext(),
        ):
            ctx = _init(cfg, namespace, python_path)
    except BaseException:
        if auth is not None:
            auth.restore()
        raise
    address = ctx.address_info.get("address") or ctx.address_info.get("gcs_address") or ""
    log.info("ray %s at %s (namespace %s)", "started" if cfg.address is None else "joined", address, namespace)
    session_dir = ctx.address_info.get("session_dir")
    return RayCluster(namespace=namespace, address=address, started_here=cfg.address is None, session_dir=session_dir, auth=auth)


def _init(cfg: ClusterConfig, namespace: str, python_path: list[str] | None) -> Any:
    return ray.init(
        # "local": a private cluster even when RAY_ADDRESS is set or another `ray start`
        # cluster runs on this machine (ray.init would otherwise join that one).
        address=cfg.address if cfg.address is not None else "local",
        num_cpus=cfg.num_cpus if cfg.address is None else None,
        resources=node_resources({"gpu", "cpu", "head"}) if cfg.address is None else None,
        namespace=namespace,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        configure_logging=True,
        runtime_env=_runtime_env(python_path or []),
        _system_config=RAY_SYSTEM_CONFIG if cfg.address is None else None,
    )


def _runtime_env(python_path: list[str]) -> dict[str, Any] | None:
    """The job's runtime env: ``python_path`` after each node's own PYTHONPATH.

    Environment variables, not ``py_modules``/``working_dir``: those upload a copy to
    Ray's object store, while a workflow on a shared filesystem is already on every node.
    Ray expands ``${PYTHONPATH}`` on each node (to nothing where it is unset).
    """
    if not python_path:
        return None
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(["${PYTHONPATH}", *python_path])}}
