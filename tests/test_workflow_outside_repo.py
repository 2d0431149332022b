"""A workflow written outside the repo runs as is, and the Agent contract holds end to end.

The workflow lives in a temporary folder and ``matrix-hpc run`` starts with ``PYTHONPATH``
unset: its module is found only through ``workflow.python_path`` (default: the config's
folder), in the driver and in the Ray workers. matrix_hpc itself comes from this checkout:
the driver runs as ``python -m matrix_hpc.cli`` from the repo root (the current folder is
on a ``-m`` driver's path, and Ray puts the driver's folder on its workers' paths), so in
a git worktree the test runs the worktree's code, not the venv's editable install.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import BIN, REPO, store_records

AGENTS = '''
"""A workflow of four non-LLM roles that exercise the Agent contract."""
import asyncio
import os
import socket
import time
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from matrix_hpc.agents import Agent, Task


@ray.remote(num_cpus=0)
def hostname() -> str:
    return socket.gethostname()  # run on a node, this proves the node's workers import this module


class Router(Agent):
    uses_llm = False

    async def setup(self) -> None:
        if self.params.get("fail_setup"):
            raise RuntimeError("no index at /nowhere")
        self.ready = "set up"  # a per-actor resource, shared by every task
        self.nodes = []
        if self.params.get("probe_nodes"):
            on = [NodeAffinitySchedulingStrategy(n["NodeID"], soft=False) for n in ray.nodes() if n["Alive"]]
            self.nodes = sorted(await asyncio.gather(*(hostname.options(scheduling_strategy=s).remote() for s in on)))

    async def close(self) -> None:
        Path(self.params["marker_dir"], f"closed-{self.role}-{os.getpid()}").write_text("ok")

    async def step(self, task: Task) -> None:
        kind = task.row["kind"]
        if kind == "ok":
            task.finish({"setup": self.ready, **({"nodes": self.nodes} if self.nodes else {})})
        else:
            task.next_role = {"forget": "forgetful", "loop": "looper", "block": "sleeper"}[kind]


class Forgetful(Agent):
    uses_llm = False

    async def step(self, task: Task) -> None:
        task.state["x"] = 1  # forgets to route


class Looper(Agent):
    uses_llm = False

    async def step(self, task: Task) -> None:
        task.state["n"] = task.state.get("n", 0) + 1
        if task.state["n"] < 3:
            task.next_role = self.role
        else:
            task.finish({"n": task.state["n"]})


class Sleeper(Agent):
    uses_llm = False

    async def step(self, task: Task) -> None:
        time.sleep(2)  # blocks the actor's event loop: the run must say so
        task.finish({"slept": True})
'''

KINDS = ["ok"] * 4 + ["forget"] * 3 + ["loop"] * 2 + ["block"]


def workflow_folder(root: Path, agent_class: str = "Router") -> Path:
    wf = root / "my_workflow"
    wf.mkdir()
    (wf / "contract_agents.py").write_text(AGENTS)
    (wf / "rows.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "kind": k}) + "\n" for i, k in enumerate(KINDS)))
    roles = {
        "router": {"agent": f"contract_agents:{agent_class}", "params": {"marker_dir": str(root / "markers"), "probe_nodes": True}},
        "forgetful": {"agent": "contract_agents:Forgetful"},
        "looper": {"agent": "contract_agents:Looper"},
        "sleeper": {"agent": "contract_agents:Sleeper"},
    }
    cfg = {
        "workflow": {"name": "contract", "entry": "router", "roles": roles},
        "dataset": {"path": "rows.jsonl"},
        "llm": {"engine": "embedded", "embedded": {"n_parallel": 2, "threads": 1}},
        "output": {"path": str(root / "out"), "flush_interval_s": 0.2},
        "run": {"progress": "off"},
    }
    (root / "markers").mkdir()
    (wf / "config.yaml").write_text(yaml.safe_dump(cfg))
    return wf / "config.yaml"


def run_without_pythonpath(
    config: Path, tmp: Path, *overrides: str, timeout: float = 240, ray_tmp: Path | None = None, command: str = "run"
) -> tuple[int, str, float]:
    """``matrix-hpc run`` (or ``command``) with PYTHONPATH unset; returns (exit code, output, seconds)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if ray_tmp is not None:  # where Ray would put a session (too long a path for its sockets: only for runs that must not start it)
        env["RAY_TMPDIR"] = str(ray_tmp)
    log = tmp / "run.log"
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "matrix_hpc.cli", command, str(config), *overrides],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True,
        )  # fmt: skip
        try:
            rc = proc.wait(timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever the run left behind (Ray's helpers)
            except ProcessLookupError:
                pass
    return rc, log.read_text(errors="replace"), time.monotonic() - t0


@pytest.fixture(scope="module")
def contract_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("outside")
    assert not str(tmp).startswith(str(REPO))
    rc, output, _ = run_without_pythonpath(workflow_folder(tmp), tmp)
    assert rc == 0, output[-3000:]
    return {"records": {r["id"]: r for r in store_records(tmp / "out")}, "output": output, "tmp": tmp}


@pytest.mark.slow
def test_workflow_outside_repo_runs_without_pythonpath(contract_run: dict[str, Any]) -> None:
    records = contract_run["records"]
    assert sorted(records) == sorted(f"r{i}" for i in range(len(KINDS)))
    ok = [records[f"r{i}"] for i, k in enumerate(KINDS) if k == "ok"]
    # setup() ran first, and a Ray task defined in the workflow's module ran on the node
    assert all(r["status"] == "ok" and r["result"] == {"setup": "set up", "nodes": [socket.gethostname()]} for r in ok)


@pytest.mark.slow
def test_step_that_forgets_to_route_fails_as_routing_and_the_run_ends(contract_run: dict[str, Any]) -> None:
    forgot = [contract_run["records"][f"r{i}"] for i, k in enumerate(KINDS) if k == "forget"]
    for r in forgot:
        assert r["status"] == "failed" and r["error"]["kind"] == "routing" and r["error"]["role"] == "forgetful"
        assert "role 'forgetful' neither routed, finished nor failed the task" in r["error"]["message"]
        assert r["hops"] == 2  # router, then forgetful once: no loop
    assert "this run:  failed routing: 3" in contract_run["output"]


@pytest.mark.slow
def test_step_that_routes_to_its_own_role_runs_again(contract_run: dict[str, Any]) -> None:
    loops = [contract_run["records"][f"r{i}"] for i, k in enumerate(KINDS) if k == "loop"]
    assert all(r["status"] == "ok" and r["result"] == {"n": 3} and r["hops"] == 4 for r in loops)


@pytest.mark.slow
def test_blocking_step_is_reported_naming_the_role(contract_run: dict[str, Any]) -> None:
    out = contract_run["output"]
    # ("actor sleeper/0: the machine is busy (...); event loop blocked ..." on a loaded machine)
    lines = [line for line in out.splitlines() if "actor sleeper/0: " in line and "event loop blocked for" in line]
    assert lines, out[-3000:]
    assert "while running: role 'sleeper' (" in lines[0] and "off CPU" in lines[0] and "asyncio.to_thread" in lines[0]
    blocked_s = float(lines[0].split("event loop blocked for ")[1].split("s")[0])
    assert 1.5 <= blocked_s < 10
    block = next(contract_run["records"][f"r{i}"] for i, k in enumerate(KINDS) if k == "block")
    assert block["status"] == "ok"


@pytest.mark.slow
def test_close_runs_once_per_actor_at_the_end(contract_run: dict[str, Any]) -> None:
    markers = sorted(p.name for p in (contract_run["tmp"] / "markers").iterdir())
    assert len(markers) == 1 and markers[0].startswith("closed-router-"), markers


@pytest.mark.slow
def test_failing_setup_stops_the_run_before_any_task(tmp_path: Path) -> None:
    config = workflow_folder(tmp_path)
    rc, output, _ = run_without_pythonpath(config, tmp_path, "workflow.roles.router.params.fail_setup=true")
    assert rc == 1, output
    assert output.strip().splitlines()[-1] == "matrix-hpc: error: workflow.roles.router: setup() failed: RuntimeError: no index at /nowhere"
    assert store_records(tmp_path / "out") == []


def test_misspelled_agent_class_fails_before_ray_starts(tmp_path: Path) -> None:
    config = workflow_folder(tmp_path, agent_class="Ruoter")
    rc, output, elapsed = run_without_pythonpath(config, tmp_path, timeout=60, ray_tmp=tmp_path / "ray")
    assert rc == 2, output
    assert output.strip() == (
        "matrix-hpc: config error: workflow.roles.router.agent: module 'contract_agents' has no attribute 'Ruoter' (did you mean 'Router'?)"
    )
    assert not (tmp_path / "ray").exists(), "a Ray session was started"
    assert not (tmp_path / "out").exists(), "the output store was created"
    # No Ray session and no store: the check ran before either (its time, ~1-2 s on an idle
    # machine, is not asserted: a busy one may take any time).


def test_submit_checks_the_workflow_code_before_submitting(tmp_path: Path) -> None:
    config = workflow_folder(tmp_path, agent_class="Ruoter")
    rc, output, _ = run_without_pythonpath(config, tmp_path, command="submit")
    assert rc == 2, output
    assert output.strip().endswith("workflow.roles.router.agent: module 'contract_agents' has no attribute 'Ruoter' (did you mean 'Router'?)")


EXPLAIN_AGENTS = """
from matrix_hpc.agents import Agent, Task


class Writer(Agent):
    uses_llm = False

    async def step(self, task: Task) -> None:
        task.finish({"explained": task.row["q"].upper()})


def metrics(records):
    return {"explained": sum(r["status"] == "ok" for r in records)}
"""


def _matrix_hpc(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed command, as a user types it (not ``python -m``, which puts ``cwd`` on the path itself)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(BIN / "matrix-hpc"), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.slow
def test_a_copy_of_a_bundled_workflow_names_its_modules_as_they_do(tmp_path: Path) -> None:
    """``explain_wf/config.yaml`` names ``explain_wf.agents:Writer``, as the bundled workflows
    name theirs (``workflows.collab_reasoning.agents:Speaker``): it runs from the folder's
    parent and from the folder itself (it failed: "No module named 'explain_wf'"); a package
    in the current folder is found as ``python -m`` finds it."""
    wf = tmp_path / "explain_wf"
    wf.mkdir()
    (wf / "agents.py").write_text(EXPLAIN_AGENTS)
    (wf / "rows.jsonl").write_text("".join(json.dumps({"id": f"e{i}", "q": f"why {i}?"}) + "\n" for i in range(5)))
    cfg = {
        "workflow": {"name": "explain", "entry": "writer", "metrics": "explain_wf.agents:metrics", "roles": {"writer": {"agent": "explain_wf.agents:Writer"}}},
        "dataset": {"path": "rows.jsonl"},
        "llm": {"engine": "external", "base_urls": ["http://127.0.0.1:9/v1"]},  # no role calls it
        "output": {"path": "out", "flush_interval_s": 0.2},
        "run": {"progress": "off"},
    }
    (wf / "config.yaml").write_text(yaml.safe_dump(cfg))

    res = _matrix_hpc(tmp_path, "run", "explain_wf/config.yaml")  # from the parent: Ray's workers import it too
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    records = {r["id"]: r for r in store_records(wf / "out")}
    assert {k: r["result"] for k, r in records.items()} == {f"e{i}": {"explained": f"WHY {i}?"} for i in range(5)}
    assert "store:     metrics explained=5" in res.stdout, res.stdout

    res = _matrix_hpc(wf, "run", "config.yaml")  # from its own folder: the code is checked, nothing is left to do
    assert res.returncode == 0 and "nothing to do: every row of the dataset is already in" in res.stderr, res.stderr[-3000:]

    # The current folder, as `python -m` has it: a project whose configs sit apart from its package.
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (wf / "agents.py").rename(wf / "moved.py")
    shutil.copytree(wf, project / "explain_wf")
    (project / "configs" / "job.yaml").write_text(yaml.safe_dump({**cfg, "output": {"path": str(wf / "out")}, "dataset": {"path": str(wf / "rows.jsonl")}}))
    (project / "explain_wf" / "moved.py").rename(project / "explain_wf" / "agents.py")
    res = _matrix_hpc(project, "run", "configs/job.yaml")
    assert res.returncode == 0 and "nothing to do" in res.stderr, res.stderr[-3000:]
    res = _matrix_hpc(tmp_path, "run", "project/configs/job.yaml")  # from elsewhere it is not found, and the line says where it looked
    assert res.returncode == 2 and "workflow.roles.writer.agent: cannot import module 'explain_wf.agents'" in res.stderr, res.stderr
