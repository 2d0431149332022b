"""Ray's own settings for every cluster this project starts (local or on Slurm nodes)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

__all__ = ["HEAD_DAEMONS_OFF", "RAY_SYSTEM_CONFIG", "lean_head", "ray_start_daemon_flags"]

log = logging.getLogger(__name__)

RAY_SYSTEM_CONFIG: dict[str, Any] = {"prestart_worker_first_driver": False}
"""No prestarted workers: Ray starts one idle Python worker per CPU for the first driver's
tasks (~80 MB each, measured), and a run's driver submits no tasks, only actors, whose
workers Ray starts for them."""

HEAD_DAEMONS_OFF: dict[str, Any] = {"no_monitor": True, "include_log_monitor": False}
"""Two of a head's Python daemons that a run never uses (~80 MB and ~0.5 s of CPU at start-up
each, measured): the autoscaler monitor (a run's nodes are fixed: Slurm's allocation, or this
machine) and the log monitor (it forwards workers' output to drivers, and every driver here
says ``log_to_driver=False``; the output stays in the session's ``logs/``). ``ray start``
spells them ``--no-monitor --include-log-monitor=false``."""


def ray_start_daemon_flags(head: bool) -> list[str]:
    """:data:`HEAD_DAEMONS_OFF` as ``ray start`` flags (every node runs a log monitor; the head the autoscaler)."""
    return ["--no-monitor", "--include-log-monitor=false"] if head else ["--include-log-monitor=false"]


@contextlib.contextmanager
def lean_head() -> Iterator[None]:
    """While ``ray.init`` starts a local head: without the daemons of :data:`HEAD_DAEMONS_OFF`,
    and without Ray's API server.

    ``ray.init`` has no argument for them; it builds its node's ``RayParams`` from its own
    arguments, so the class it builds is swapped for one with these two fields set, for the
    start only (``ray.init`` keeps everything else it does for a new cluster: the token, the
    reaper that stops the daemons if this process is killed). A Ray without these fields
    starts its head as it always did (the test ``test_local_head_runs_only_the_daemons_a_run_uses``
    says so).

    The API server (``dashboard.py``) starts even with ``include_dashboard=False``; then it
    loads one module, usage statistics (a report to Ray's servers, which a run has no use for
    and no network to send), for ~115 MB of RSS, and ``ray.init`` waits for it to come up.
    ``Node.start_api_server`` is skipped for a node whose ``include_dashboard`` is False (every
    local head here), for the start only. Nothing a run uses reads what it would have written
    (the dashboard's address in Ray's KV store).
    """
    from ray._private import node, parameter

    with _lean_params(parameter), _no_api_server(node):
        yield


@contextlib.contextmanager
def _lean_params(parameter: Any) -> Iterator[None]:
    original = parameter.RayParams
    if not all(hasattr(original(), k) for k in HEAD_DAEMONS_OFF):
        log.debug("this Ray's RayParams lacks %s: its head starts every daemon", sorted(HEAD_DAEMONS_OFF))
        yield
        return

    class LeanRayParams(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, **HEAD_DAEMONS_OFF})

    parameter.RayParams = LeanRayParams
    try:
        yield
    finally:
        parameter.RayParams = original


@contextlib.contextmanager
def _no_api_server(node: Any) -> Iterator[None]:
    original = getattr(node.Node, "start_api_server", None)
    if original is None:
        log.debug("this Ray's Node has no start_api_server: its head starts the API server")
        yield
        return

    def start_api_server(self: Any, *, include_dashboard: bool | None, raise_on_failure: bool) -> None:
        if include_dashboard is False:
            log.debug("no API server: include_dashboard=False")
            return
        original(self, include_dashboard=include_dashboard, raise_on_failure=raise_on_failure)

    node.Node.start_api_server = start_api_server
    try:
        yield
    finally:
        node.Node.start_api_server = original
