"""Agent actors import only what they use (issue 25, memory): an actor whose roles call no
LLM imports neither aiohttp nor the LLM client and registry (~7 MB of RSS per process), and
no agent actor imports difflib, which only the error messages of a bad config need.

Real Ray actors built as the team builds them (``AgentActor.options(...).remote(spec, role,
index)``, then ``setup()``), on a private local Ray; each reports its own ``sys.modules``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import ray

from matrix_hpc.cluster.auth import RayAuth
from matrix_hpc.runtime.actor import AgentActor, actor_name
from matrix_hpc.runtime.spec import ClientSpec, RoleSpec, TeamSpec

from .conftest import REPO

NS = "actor-imports"
LLM_ONLY = ["aiohttp", "matrix_hpc.services.llm.client", "matrix_hpc.services.llm.registry"]
"""What only an actor whose roles call an LLM needs."""
NEVER = ["difflib"]
"""What no agent actor needs at run time (a config error's "did you mean" is found on the driver)."""


@pytest.fixture
def local_ray(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Ray's workers import the test agents from the repository (they inherit this environment).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    auth = RayAuth(token=secrets.token_hex(32))
    ray.init(address="local", num_cpus=2, namespace=NS, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        auth.restore()


def _imported(actor: Any, names: list[str]) -> list[str]:
    """Which of ``names`` the actor's process has imported. The lambda is pickled by value:
    the actor runs it without importing this module (and pytest)."""
    return ray.get(actor.__ray_call__.remote(lambda _, names: [n for n in names if n in __import__("sys").modules], names), timeout=60)


def _started(spec: TeamSpec, role: str) -> Any:
    actor = AgentActor.options(name=actor_name(spec.run_id, role, 0), namespace=NS).remote(spec, role, 0)
    assert ray.get(actor.setup.remote(), timeout=120) is None
    return actor


def test_an_actor_imports_the_llm_client_only_when_its_roles_call_an_llm(local_ray: None) -> None:
    model = ClientSpec(name="m", served_name="m", urls=["http://127.0.0.1:9/v1"])  # never called
    roles = {
        "copy": RoleSpec("tests.hf_agents:Copy", 1, 2),  # uses_llm = False
        "teacher": RoleSpec("workflows.collab_reasoning.agents:Speaker", 1, 2, model="m"),
    }
    spec = TeamSpec("imports", NS, roles, models={"m": model}, metrics=False, loop_lag_warn_s=0)
    plain, caller = _started(spec, "copy"), _started(spec, "teacher")
    try:
        names = LLM_ONLY + NEVER
        assert _imported(plain, names) == []
        # The same probe sees what an LLM role's actor does import (it builds its client).
        assert _imported(caller, names) == ["aiohttp", "matrix_hpc.services.llm.client"]
    finally:
        for actor in (plain, caller):
            ray.get(actor.close.remote(), timeout=60)
