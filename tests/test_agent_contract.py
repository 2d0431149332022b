"""The Agent contract, without Ray: the step's routing rule, the loop-lag watch, and the
check of a workflow's code before anything starts (errors name the key)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from matrix_hpc.agents import Agent, AgentContext, Task
from matrix_hpc.config import ConfigError, load_config
from matrix_hpc.runtime.agent import run_step
from matrix_hpc.runtime.health import LoopLagWatcher
from matrix_hpc.runtime.loader import check_workflow_code, import_paths

ROLES = {"a", "b"}


class Forgets(Agent):
    uses_llm = False

    async def step(self, task: Task) -> None:
        task.state["seen"] = True  # does work, but neither routes, finishes nor fails


class RoutesToItself(Agent):
    uses_llm = False

    async def step(self, task: Task) -> None:
        task.state["n"] = task.state.get("n", 0) + 1
        if task.state["n"] < 3:
            task.next_role = self.role  # explicit: run this role again
        else:
            task.finish({"n": task.state["n"]})


def agent(cls: type[Agent], role: str = "a") -> Agent:
    return cls(AgentContext(role, {}, None, 16, 0.0))


def test_step_that_does_not_route_fails_as_routing_naming_the_role() -> None:
    task = Task(id="t1", row={}, next_role="a")
    asyncio.run(run_step(agent(Forgets), task, "a", ROLES))
    assert task.done and task.error is not None
    assert task.error.kind == "routing" and task.error.role == "a"
    assert "role 'a' neither routed, finished nor failed" in task.error.message


def test_explicit_route_to_the_same_role_is_not_an_error() -> None:
    task = Task(id="t1", row={}, next_role="a")
    ag = agent(RoutesToItself)
    for _ in range(2):
        asyncio.run(run_step(ag, task, "a", ROLES))
        assert task.error is None and task.next_role == "a"
    asyncio.run(run_step(ag, task, "a", ROLES))
    assert task.done and task.error is None and task.result == {"n": 3} and task.hops == 3


def test_routed_flag_is_cleared_before_each_step() -> None:
    """A task that arrives routed (the previous role set next_role) must route again."""
    task = Task(id="t1", row={}, next_role="b")
    assert task.routed is False  # construction does not count
    task.next_role = "a"
    assert task.routed
    asyncio.run(run_step(agent(Forgets), task, "a", ROLES))
    assert task.error is not None and task.error.kind == "routing"


def test_loop_lag_watcher_names_the_running_role_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    # A quiet machine's wording (a busy one prefixes a note: see ..._a_busy_machine_is_named_first).
    watcher = LoopLagWatcher("actor slow/0", threshold_s=0.3, probe_s=0.05, report_every_s=30.0, machine_load=lambda: (0.0, 2))

    async def main() -> None:
        watch = asyncio.create_task(watcher.run())
        await asyncio.sleep(0.1)

        async def blocking_step(role: str) -> None:
            watcher.started(f"role {role!r}")
            try:
                time.sleep(0.5)  # what a careless agent does
                await asyncio.sleep(0.1)
            finally:
                watcher.ended(f"role {role!r}")

        await blocking_step("slow")
        await asyncio.sleep(0.1)
        await blocking_step("slow")  # within report_every_s: counted, not reported yet
        await asyncio.sleep(0.2)
        watch.cancel()

    with caplog.at_level(logging.WARNING, logger="matrix_hpc.runtime.health"):
        asyncio.run(main())
    warnings = watcher.take_warnings()
    assert len(warnings) == 1, warnings
    assert "actor slow/0: event loop blocked for 0." in warnings[0] and "while running: role 'slow' (" in warnings[0]
    assert "asyncio.to_thread" in warnings[0]
    assert watcher.worst_s >= 0.4
    assert [r.getMessage() for r in caplog.records] == list(warnings)
    assert watcher.take_warnings() == ()  # handed to the driver once


def test_loop_lag_watcher_is_quiet_for_a_well_behaved_loop() -> None:
    """Awaiting steps do not count, nor does a stall while no step runs (not the workflow's doing)."""
    watcher = LoopLagWatcher("actor fine/0", threshold_s=0.3, probe_s=0.05, report_every_s=0.0)

    async def step(i: int) -> None:
        watcher.started("role 'fine'")
        await asyncio.sleep(0.05 * i)
        watcher.ended("role 'fine'")

    async def main() -> None:
        watch = asyncio.create_task(watcher.run())
        await asyncio.gather(*(step(i) for i in range(10)))
        await asyncio.sleep(0.1)
        time.sleep(0.5)  # nothing of the workflow running: Ray's own work, a loaded machine
        await asyncio.sleep(0.1)
        watch.cancel()

    asyncio.run(main())
    assert watcher.take_warnings() == ()


def test_loop_lag_split_names_the_largest_share() -> None:
    """LoopClock.share splits a late interval; the cause is its largest part."""
    from matrix_hpc.runtime.health import LoopClock

    # (wall, on CPU, waiting for a CPU, gc) at both ends; 0.1 s of the interval was the expected sleep
    gc_stall = LoopClock.share((0.0, 0.0, 0.0, 0.0), (2.1, 1.9, 0.1, 1.8), 0.1)
    assert gc_stall.cause == "gc" and round(gc_stall.late_s, 6) == 2.0 and round(gc_stall.on_cpu_s, 6) == 0.1
    starved = LoopClock.share((5.0, 1.0, 1.0, 3.0), (6.6, 1.2, 2.3, 3.0), 0.1)
    assert starved.cause == "cpu_wait" and round(starved.off_cpu_s, 6) == 0.1  # the probe's own sleep
    sleeping = LoopClock.share((0.0, 0.0, None, 0.0), (1.1, 0.01, None, 0.0), 0.1)
    assert sleeping.cause == "off_cpu" and sleeping.cpu_wait_s is None and "waiting for a CPU" not in sleeping.describe()
    busy = LoopClock.share((0.0, 0.0, 0.0, 0.0), (1.1, 0.9, 0.05, 0.0), 0.1)
    assert busy.cause == "on_cpu"


def test_loop_lag_parts_add_up_and_a_busy_machine_is_named_first() -> None:
    """The user's warning: 16 tasks in flight, other jobs on the machine, and the stall blamed
    on "many tasks in flight per actor", with parts adding up to more than the stall. A
    collection's wall time on a starved thread is mostly waiting for a CPU."""
    from matrix_hpc.runtime.health import LoopClock, StallShare

    # 1.3 s interval: 0.2 s on CPU (of it 0.15 collecting), 0.9 s runnable but not running;
    # the collection's wall time (0.9 s) was mostly that wait.
    share = LoopClock.share((0.0, 0.0, 0.0, 0.0), (1.3, 0.2, 0.9, 0.9), 0.1)
    parts = share.gc_s + (share.cpu_wait_s or 0) + share.on_cpu_s + share.off_cpu_s
    assert abs(parts - 1.3) < 1e-9 and abs(share.late_s - 1.2) < 1e-9, share
    assert share.cause == "cpu_wait" and share.gc_s < 0.41, share
    for case in [((0, 0, 0, 0), (2.1, 1.9, 0.1, 1.8)), ((0, 0, None, 0), (1.1, 0.01, None, 0.9)), ((0, 0, 0, 0), (0.5, 0.6, 0.2, 0))]:
        s = LoopClock.share(*case, 0.1)  # type: ignore[arg-type]
        assert abs(s.gc_s + (s.cpu_wait_s or 0) + s.on_cpu_s + s.off_cpu_s - case[1][0]) < 1e-9, (case, s)

    def report(load: float, cores: int, worst: StallShare) -> str:
        watcher = LoopLagWatcher("actor critic/0", threshold_s=0.5, machine_load=lambda: (load, cores))
        watcher._report(worst, 3, {"role 'critic'"})
        (msg,) = watcher.take_warnings()
        return msg

    busy = report(9.6, 2, share)
    assert busy.startswith(
        "actor critic/0: the machine is busy (load average 9.6 on 2 cores: other processes compete for its CPUs); event loop late by 1.2s"
    ), busy
    assert "mostly waiting for a CPU (of the 1.30s probe interval:" in busy and "tasks in flight" not in busy, busy
    quiet_gc = report(0.5, 2, LoopClock.share((0, 0, 0, 0), (2.1, 1.9, 0.1, 1.8), 0.1))
    assert "machine is busy" not in quiet_gc and "mostly in garbage collection" in quiet_gc, quiet_gc


def test_loop_lag_watcher_does_not_blame_a_step_for_a_garbage_collection() -> None:
    """A full collection over a big heap stalls the loop while steps are in flight (tens of
    thousands of tasks per actor); the warning says so instead of calling a step blocking."""
    import gc

    watcher = LoopLagWatcher("actor big/0", threshold_s=0.1, probe_s=0.02, report_every_s=0.0, machine_load=lambda: (0.0, 2))
    heap = [[i] for i in range(4_000_000)]  # live container objects a full pass must walk

    async def main() -> None:
        watch = asyncio.create_task(watcher.run())
        await asyncio.sleep(0.1)
        watcher.started("role 'busy'")
        try:
            await asyncio.sleep(0.05)
            gc.collect()  # what the actor's paced full collection (gcbudget) does
            await asyncio.sleep(0.1)
        finally:
            watcher.ended("role 'busy'")
        watch.cancel()

    asyncio.run(main())
    del heap
    warnings = watcher.take_warnings()
    assert len(warnings) == 1, warnings
    # Mostly collecting on a quiet machine; on a busy one much of its wall time is waiting for a
    # CPU, and the warning says that instead; never a step's fault.
    assert "not in a step" in warnings[0] and "asyncio.to_thread" not in warnings[0], warnings
    assert "mostly in garbage collection" in warnings[0] or "mostly waiting for a CPU" in warnings[0], warnings
    assert float(re.search(r"garbage collection ([\d.]+)s", warnings[0])[1]) >= 0.05, warnings


def test_closing_an_actor_with_many_idle_workers_costs_o1_per_worker() -> None:
    """close() ends an actor's idle workers without a linear scan each: cancelling a task that
    waits in asyncio.Queue.get removes its waiter from the queue's deque, O(workers) apiece,
    which made close() of a 50,000-worker actor take over 30 s. Counted, not timed."""
    import collections

    from matrix_hpc.runtime.actor import AgentActor
    from matrix_hpc.runtime.spec import RoleSpec, TeamSpec

    class CountingDeque(collections.deque):  # type: ignore[type-arg]
        removes = 0

        def remove(self, value: object) -> None:
            CountingDeque.removes += 1
            super().remove(value)

    workers = 5000
    spec = TeamSpec("r", "ns", {"slow": RoleSpec("tests.fault_agents:Slow", 1, workers)}, metrics=False, loop_lag_warn_s=0)
    actor = AgentActor.__ray_metadata__.modified_class(spec, "slow", 0)

    async def main() -> None:
        assert await actor.setup() is None
        await asyncio.sleep(0.2)  # every worker now waits for a task
        queue = actor._queue
        assert queue is not None and len(queue._getters) == workers
        queue._getters = CountingDeque(queue._getters)
        await actor.close()
        await asyncio.sleep(0)
        assert all(t.done() for t in actor._loops)

    asyncio.run(main())
    assert CountingDeque.removes == 0, f"{CountingDeque.removes} waiters removed one by one"


def test_closing_an_actor_closes_its_call_journal_after_flushing_it(tmp_path: Path) -> None:
    """The actor's journal (run.replay) is flushed and its file closed when the actor closes
    (Replay.close() was never called: its file and its readers' files stayed open)."""
    from matrix_hpc.runtime.actor import AgentActor
    from matrix_hpc.runtime.spec import ClientSpec, RoleSpec, TeamSpec
    from matrix_hpc.services.llm.client import ChatResult

    model = ClientSpec(name="m", served_name="m", urls=["http://127.0.0.1:9/v1"])  # never called
    roles = {"teacher": RoleSpec("workflows.collab_reasoning.agents:Speaker", 1, 2, model="m")}
    spec = TeamSpec("r", "ns", roles, models={"m": model}, metrics=False, loop_lag_warn_s=0, journal_dir=str(tmp_path))
    actor = AgentActor.__ray_metadata__.modified_class(spec, "teacher", 0)

    def open_journal_fds() -> list[str]:
        links = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}")]
        return [link for link in links if link.startswith(str(tmp_path))]

    async def main() -> None:
        assert await actor.setup() is None
        assert actor._replay is not None and open_journal_fds()
        res = ChatResult(text="hi", prompt_tokens=3, completion_tokens=1, latency_s=0.1, endpoint="http://e", model="m")
        actor._replay.record("d" * 32, "t1", res, 1.0)  # queued, not yet flushed
        await actor.close()

    asyncio.run(main())
    assert open_journal_fds() == []
    (journal,) = [p for p in tmp_path.iterdir() if p.is_file()]
    assert journal.stat().st_size > 0  # the queued entry was flushed before the file closed


# --- the workflow's code is checked before Ray starts --------------------------------------

AGENTS = """
from matrix_hpc.agents import Agent, Task

class Teacher(Agent):
    async def step(self, task: Task) -> None:
        task.finish({})

def metrics(records):
    return {"n": len(list(records))}

not_a_function = 3
"""


@pytest.fixture(autouse=True)
def isolated_imports(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test imports its own ``c_agents`` from its own folder."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    sys.modules.pop("c_agents", None)
    yield
    sys.modules.pop("c_agents", None)


def outside_workflow(tmp_path: Path, **roles_agent: str) -> Path:
    """A workflow folder of its own (module ``c_agents``), as a user writes one outside the repo."""
    wf = tmp_path / "my_wf"
    wf.mkdir()
    (wf / "c_agents.py").write_text(AGENTS)
    (wf / "rows.jsonl").write_text('{"id": "1"}\n')
    cfg = {
        "workflow": {"name": "w", "entry": "teacher", "roles": {r: {"agent": a} for r, a in roles_agent.items()}},
        "dataset": {"path": "rows.jsonl"},
    }
    (wf / "config.yaml").write_text(yaml.safe_dump(cfg))
    return wf / "config.yaml"


def test_workflow_folder_is_on_the_import_path(tmp_path: Path) -> None:
    config = load_config(outside_workflow(tmp_path, teacher="c_agents:Teacher"), ["workflow.metrics=c_agents:metrics"])
    assert import_paths(config) == [str((tmp_path / "my_wf").resolve())]
    check_workflow_code(config)  # imports c_agents from the config's folder


@pytest.mark.parametrize(
    "agent_path, overrides, message",
    [
        ("c_agents:Teachr", [], "workflow.roles.teacher.agent: module 'c_agents' has no attribute 'Teachr' (did you mean 'Teacher'?)"),
        ("c_agentz:Teacher", [], "workflow.roles.teacher.agent: cannot import module 'c_agentz' (No module named 'c_agentz'); workflow.python_path folders: "),
        ("c_agents:metrics", [], "workflow.roles.teacher.agent: c_agents:metrics is not a subclass of matrix_hpc.agents.Agent"),
        ("c_agents:Teacher", ["workflow.metrics=c_agents:not_a_function"], "workflow.metrics: c_agents:not_a_function is not callable"),
        ("c_agents:Teacher", ["workflow.metrics=c_agents:metrix"], "workflow.metrics: module 'c_agents' has no attribute 'metrix' (did you mean 'metrics'?)"),
        ("c_agents:Teacher", ["workflow.python_path=[]"], "workflow.roles.teacher.agent: cannot import module 'c_agents'"),
    ],
)
def test_bad_workflow_code_names_the_key(tmp_path: Path, agent_path: str, overrides: list[str], message: str) -> None:
    config = load_config(outside_workflow(tmp_path, teacher=agent_path), overrides)
    with pytest.raises(ConfigError) as err:
        check_workflow_code(config)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_a_stall_of_another_kind_does_not_hold_back_a_blocking_step() -> None:
    """On a busy machine the first stall reported is often not a step's (garbage collection, a
    wait for a CPU); a step that then blocks the loop within the same interval is the one a
    user can fix, and is reported at once, not held back (or hidden) until the next interval."""
    import gc

    watcher = LoopLagWatcher("actor mixed/0", threshold_s=0.1, probe_s=0.02, report_every_s=30.0, machine_load=lambda: (0.0, 2))
    heap = [[i] for i in range(4_000_000)]  # a full pass over it stalls the loop (as gcbudget's does)

    async def main() -> None:
        watch = asyncio.create_task(watcher.run())
        await asyncio.sleep(0.1)
        watcher.started("role 'busy'")
        try:
            await asyncio.sleep(0.05)
            gc.collect()  # stall 1: garbage collection (or, on a loaded machine, a wait for a CPU)
            await asyncio.sleep(0.1)
            time.sleep(1.5)  # stall 2, within report_every_s: a blocking step, off CPU whatever the load
            await asyncio.sleep(0.1)
        finally:
            watcher.ended("role 'busy'")
        watch.cancel()

    asyncio.run(main())
    del heap
    warnings = watcher.take_warnings()
    assert len(warnings) == 2, warnings
    assert "event loop blocked for" not in warnings[0], warnings
    assert "event loop blocked for 1." in warnings[1] and "role 'busy'" in warnings[1], warnings
