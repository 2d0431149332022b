"""A Ray cluster for one run: a private local one, or an existing one by address."""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

import ray

from ..config import ClusterConfig
from ..labels import node_resources

__all__ = ["RayCluster", "start_ray"]

log = logging.getLogger(__name__)


@dataclass
class RayCluster:
    namespace: str
    address: str
    started_here: bool
    session_dir: str | None = None
    """Ray's folder for this cluster: ``logs/`` holds every actor's output."""

    def shutdown(self) -> None:
        if ray.is_initialized():
            ray.shutdown()


def start_ray(cfg: ClusterConfig, namespace: str) -> RayCluster:
    """Start (or join) Ray. Actor logs stay in Ray's session folder, not on the terminal."""
    # A private local cluster is reachable only from this machine; Ray's token auth
    # adds nothing there and prints a warning on every start.
    if cfg.address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # ray.init installs its own SIGTERM handler (which exits at once); keep the
    # caller's, so SIGTERM still means "stop intake and save finished work".
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    ctx = ray.init(
        address=cfg.address,
        num_cpus=cfg.num_cpus if cfg.address is None else None,
        resources=node_resources({"gpu", "cpu", "head"}) if cfg.address is None else None,
        namespace=namespace,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        configure_logging=True,
    )
    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)
    address = ctx.address_info.get("address") or ctx.address_info.get("gcs_address") or ""
    log.info("ray %s at %s (namespace %s)", "started" if cfg.address is None else "joined", address, namespace)
    session_dir = ctx.address_info.get("session_dir")
    return RayCluster(namespace=namespace, address=address, started_here=cfg.address is None, session_dir=session_dir)
