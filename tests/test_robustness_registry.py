"""An endpoint registry restarted after a crash serves the replicas that start again
(issue 20, item 13): one replica that fails to start is reported and retried, while
every client's ``endpoints()`` keeps answering with the others.

A real registry actor on a private local Ray, two real embedded engines. Replica 1
serves a copy of the model file; after the first start the test overwrites that copy,
so when Ray restarts the crashed registry, replica 1's engine exits during start-up.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from ray.exceptions import ActorUnavailableError

from matrix_hpc.config import EmbeddedEngineConfig
from matrix_hpc.services.llm.embedded import default_model_path
from matrix_hpc.services.llm.registry import EndpointRegistry, registry_name
from matrix_hpc.services.llm.replica import ReplicaSpec

from .conftest import private_ray

pytestmark = pytest.mark.slow

NS = "registry-robustness"


@pytest.fixture
def local_ray() -> Iterator[None]:
    # Token auth as a run has it (start_ray's RayAuth also makes this process's Ray read the
    # mode again, whatever an earlier in-process cluster of the session left cached).
    with private_ray(NS):
        yield


def _worker_logs_mentioning(text: str) -> int:
    """Lines of every Ray worker's log under this session that contain ``text``."""
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return sum(f.read_text(errors="replace").count(text) for f in logs.glob("worker-*") if f.is_file())


def _alive(pid: int | None) -> bool:
    try:
        os.kill(pid or 0, 0) if pid else None
    except ProcessLookupError:
        return False
    return bool(pid)


def _once_back(call: Any, timeout_s: float = 240.0) -> Any:
    """``call()``'s result once the restarting actor takes calls again (what clients do)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(call(), timeout=timeout_s)
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_restarted_registry_serves_the_replicas_that_start_and_reports_the_one_that_does_not(local_ray: None, tmp_path: Path) -> None:
    model = tmp_path / "copy.gguf"
    shutil.copy(default_model_path(), model)
    logs = str(tmp_path / "logs")
    good = ReplicaSpec("embedded", "default", logs, EmbeddedEngineConfig(n_parallel=2, threads=1), 60.0, model_key="m")
    bad = ReplicaSpec("embedded", "default", logs, EmbeddedEngineConfig(model_path=str(model), n_parallel=2, threads=1), 60.0, model_key="m")
    reg = EndpointRegistry.options(name=registry_name("r1", "m"), namespace=NS, max_concurrency=1000).remote(
        "r1", NS, "m", [good, bad], [], "default", None, 1.0, 2, 2, 10.0,
    )  # fmt: skip
    try:
        first = ray.get(reg.start.remote(), timeout=240)
        assert [e.state for e in first] == ["up", "up"], first
        model.write_bytes(b"this is no longer a model")  # replica 1 cannot start again

        old_replica = first[0].actor_pid
        ray.kill(reg, no_restart=False)  # a crash: Ray restarts the registry (max_restarts=-1)
        while _alive(old_replica):  # its replicas die with it (it owns them): the old incarnation is gone
            time.sleep(0.2)
        # The first call of the new incarnation starts both replicas again; one fails.
        version, urls = _once_back(lambda: reg.endpoints.remote(-1, 0.0))  # raised for every client before the fix
        status = ray.get(reg.status.remote(), timeout=60)
        by_replica = {e.replica: e for e in status}
        assert by_replica[0].state == "up" and urls == [by_replica[0].url], (urls, status)
        assert by_replica[1].state in ("down", "restarting", "failed"), status
        assert by_replica[1].last_error and "start" in by_replica[1].last_error, by_replica[1]
        # Clients' other calls answer too (they used to re-raise the failed start).
        ray.get(reg.report_completions.remote({urls[0]: 1}), timeout=30)
        assert ray.get(reg.endpoints.remote(version, 0.0), timeout=30)[1] == urls
        assert _worker_logs_mentioning("replica 1 did not start") == 1  # said once, then retried quietly by its watch
    finally:
        ray.get(reg.stop.remote(), timeout=60)
