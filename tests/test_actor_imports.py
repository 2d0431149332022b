"""Agent actors import only what they use (issue 25, memory): an actor whose roles call no
LLM imports neither aiohttp nor the LLM client and registry (~7 MB of RSS per process); no
agent actor imports zarr when it looks the sink up to send it records (``ray.get_actor``
unpickles the sink's class, and so imports its module: ~8 MB), nor difflib, which only a
misspelt name's "did you mean" needs.

Real Ray actors built as the team builds them (``SinkActor`` and ``AgentActor`` named by
``sink_name``/``actor_name``, then ``setup()``), on a private local Ray; a task goes through
a no-LLM actor to the sink, and each actor reports its own ``sys.modules``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from matrix_hpc.runtime.actor import AgentActor, actor_name, sink_name
from matrix_hpc.runtime.sink import SinkActor
from matrix_hpc.runtime.spec import ClientSpec, RoleSpec, TeamSpec
from matrix_hpc.runtime.task import Task

from .conftest import REPO, private_ray

NS = "actor-imports"
LLM_ONLY = ["aiohttp", "matrix_hpc.services.llm.client", "matrix_hpc.services.llm.registry"]
"""What only an actor whose roles call an LLM needs."""
NEVER = ["zarr", "difflib"]
"""What no agent actor needs: the sink writes the store; a config error's hint is found on the driver."""


@pytest.fixture
def local_ray(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Ray's workers import the test agents from the repository (they inherit this environment).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    with private_ray(NS):
        yield


def _imported(actor: Any, names: list[str]) -> list[str]:
    """Which of ``names`` the actor's process has imported. The lambda is pickled by value:
    the actor runs it without importing this module (and pytest)."""
    return ray.get(actor.__ray_call__.remote(lambda _, names: [n for n in names if n in __import__("sys").modules], names), timeout=60)


def _started(spec: TeamSpec, role: str) -> Any:
    actor = AgentActor.options(name=actor_name(spec.run_id, role, 0), namespace=NS).remote(spec, role, 0)
    assert ray.get(actor.setup.remote(), timeout=120) is None
    return actor


def test_agent_actors_import_neither_zarr_nor_an_unused_llm_client(local_ray: None, tmp_path: Path) -> None:
    model = ClientSpec(name="m", served_name="m", urls=["http://127.0.0.1:9/v1"])  # never called
    roles = {
        "copy": RoleSpec("tests.hf_agents:Copy", 1, 2),  # uses_llm = False
        "teacher": RoleSpec("workflows.collab_reasoning.agents:Speaker", 1, 2, model="m"),
    }
    spec = TeamSpec("imports", NS, roles, models={"m": model}, metrics=False, loop_lag_warn_s=0)
    sink = SinkActor.options(name=sink_name(spec.run_id), namespace=NS).remote(str(tmp_path / "out"), 64, 0.05, False, False)
    plain, caller = _started(spec, "copy"), _started(spec, "teacher")
    try:
        # A finished task goes to the sink: the actor looks it up by name and sends its record.
        ray.get(plain.receive.remote([Task(id="t0", row={"question": "q"}, next_role="copy")]), timeout=60)
        deadline = time.monotonic() + 120
        while ray.get(sink.committed.remote(["t0"]), timeout=60) != ["t0"]:
            assert time.monotonic() < deadline, "t0 never reached the sink"
            time.sleep(0.1)
        names = LLM_ONLY + NEVER
        assert _imported(plain, names) == []
        # The same probe sees what the others do import: the sink its store, an LLM role's
        # actor the client it builds.
        assert _imported(sink, names) == ["zarr"]
        assert _imported(caller, names) == ["aiohttp", "matrix_hpc.services.llm.client"]
    finally:
        for actor in (plain, caller):
            ray.get(actor.close.remote(), timeout=60)
