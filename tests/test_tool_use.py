"""The tool-use workflow: its tools, its scenarios, tool-call parsing, and the assistant's
tool execution in real bubblewrap sandboxes leased from a real pool (no LLM needed:
the replies are written here, so the mechanics are tested whatever a model says)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from matrix_hpc.agents import AgentContext, Task
from matrix_hpc.config import Sampling
from matrix_hpc.services.sandbox import pool_actor_name, pool_config
from workflows.tool_use.agents import Assistant, Evaluator, UserSim, check_row, metrics, start_state
from workflows.tool_use.env import tools
from workflows.tool_use.environment import load_base_db
from workflows.tool_use.protocol import ToolCall, from_openai, parse_text_calls, recent, render, user_view

from .conftest import private_ray

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = REPO / "workflows" / "tool_use"
SCENARIOS = {json.loads(line)["id"]: json.loads(line) for line in (WORKFLOW / "data" / "scenarios.jsonl").read_text().splitlines() if line.strip()}
KNOWN = set(tools.IMPLEMENTATIONS)


def test_bundled_scenarios_are_valid_and_varied() -> None:
    db = load_base_db()
    assert 12 <= len(SCENARIOS) <= 20
    for sid, row in SCENARIOS.items():
        assert check_row(row, db) is None, sid
    kinds = {a["name"] for row in SCENARIOS.values() for a in row["expected_actions"]}
    assert kinds == tools.WRITES
    assert sum(not row["expected_actions"] for row in SCENARIOS.values()) >= 4  # refusals are scenarios too


def test_tools_enforce_the_shop_rules() -> None:
    db = load_base_db()
    assert tools.call(db, "get_order", {"order_id": "#W1003"})["result"]["status"] == "shipped"
    assert tools.call(db, "cancel_order", {"order_id": "W1003", "reason": "no longer needed"}) == {
        "ok": False, "error": "order W1003 is shipped; only pending orders can be cancelled"}  # fmt: skip
    assert not tools.call(db, "refund_order", {"order_id": "W1004", "amount": 60, "reason": "leaks"})["ok"]
    assert tools.call(db, "refund_order", {"order_id": "W1004", "amount": "15", "reason": "leaks"})["ok"]
    assert "bad arguments" in tools.call(db, "get_order", {"id": "W1001"})["error"]
    assert tools.call(db, "rm_rf", {})["error"] == "unknown tool 'rm_rf'"
    with pytest.raises(ValueError, match="only pending orders"):
        tools.replay(load_base_db(), [{"name": "cancel_order", "arguments": {"order_id": "W1003", "reason": "no longer needed"}}])


def test_tool_calls_are_parsed_from_text_and_openai_format() -> None:
    text = 'Sure. {"tool": "get_order", "arguments": {"order_id": "W1001"}} and {"name": "nope", "arguments": {}} {"function": {"name": "get_account", "arguments": "{\\"account_id\\": \\"A100\\"}"}}'
    calls = parse_text_calls(text, KNOWN)
    assert [(c.name, c.arguments) for c in calls] == [("get_order", {"order_id": "W1001"}), ("get_account", {"account_id": "A100"})]
    assert parse_text_calls("I will cancel {your order} now", KNOWN) == []
    native = [{"id": "c1", "type": "function", "function": {"name": "get_order", "arguments": '{"order_id": "W1"}'}},
              {"id": "c2", "type": "function", "function": {"name": "get_order", "arguments": "not json"}}]  # fmt: skip
    assert from_openai(native, KNOWN) == [ToolCall("c1", "get_order", {"order_id": "W1"})]


def test_rendering_for_text_mode_and_the_user_view() -> None:
    call = ToolCall("c1", "get_order", {"order_id": "W1001"})
    messages = [
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "Where is W1001?"},
        {"role": "assistant", "content": None, "tool_calls": [call.to_openai()]},
        {"role": "tool", "tool_call_id": "c1", "name": "get_order", "content": '{"ok": true}'},
        {"role": "assistant", "content": "It is pending."},
    ]
    assert render(messages, "native") is messages
    text = render(messages, "text")
    assert text[2] == {"role": "assistant", "content": '{"tool": "get_order", "arguments": {"order_id": "W1001"}}'}
    assert text[3] == {"role": "user", "content": 'Result of get_order: {"ok": true}'}
    assert user_view(messages) == [
        {"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Where is W1001?"}, {"role": "user", "content": "It is pending."}]  # fmt: skip
    assert recent(messages, 10) == [messages[-1]]
    assert recent(messages[:4], 30) == messages[2:4]  # a result keeps its call
    assert recent(messages, 10_000) == messages


@pytest.fixture(scope="module")
def pool_params() -> Iterator[dict[str, Any]]:
    with private_ray("tool-use-tests"):  # as a run starts its Ray: token auth, loopback, lean head
        root = tempfile.mkdtemp(prefix="mhs-tool-use-", dir="/tmp")
        os.chmod(root, 0o711)
        sandbox = {"size": 2, "root_dir": root, "idle_exit_s": None, "limits": {"wall_s": 10, "memory_mb": 512}}
        yield {"sandbox_pool": "tool-use-test-pool", "sandbox": sandbox, "tool_calling": "text", "max_turns": 3}
        with contextlib.suppress(ValueError):
            pool = ray.get_actor(pool_actor_name("tool-use-test-pool"))
            ray.get(pool.shutdown.remote())
            ray.kill(pool)
    shutil.rmtree(root, ignore_errors=True)


def ctx(role: str, params: dict[str, Any]) -> AgentContext:
    """The context the runtime builds: the sandbox settings come from the job's ``sandbox`` section."""
    rest = {k: v for k, v in params.items() if k != "sandbox"}
    return AgentContext(role, rest, None, Sampling(16, 0.0), sandbox=pool_config(params.get("sandbox")))


def new_task(sid: str) -> Task:
    task = Task(id=sid, row=SCENARIOS[sid], next_role="assistant")
    start_state(task)
    task.state["messages"].append({"role": "user", "content": "scripted customer message"})
    return task


async def act(assistant: Assistant, task: Task, replies: list[str]) -> None:
    """One assistant step whose model replies are ``replies``: each one's tool calls run in the sandbox."""
    async with contextlib.AsyncExitStack() as stack:
        env = None
        for reply in replies:
            calls = parse_text_calls(reply, assistant.known)
            env = await assistant.execute(task, reply, calls, stack, env)
        assert env is not None
        await assistant.save(task, env)


def evaluate(task: Task, params: dict[str, Any]) -> dict[str, Any]:
    task.state["termination"] = "user_stop"
    asyncio.run(Evaluator(ctx("evaluator", params)).step(task))
    assert task.result is not None
    return task.result


def test_assistant_runs_tool_calls_in_sandboxes_and_earns_the_reward(pool_params: dict[str, Any]) -> None:
    assistant = Assistant(ctx("assistant", pool_params))
    task = new_task("shop-13")  # cancel W1007 (ordered by mistake) and change A103's email
    asyncio.run(act(assistant, task, [
        'Let me check. {"tool": "find_account_by_email", "arguments": {"email": "david.okafor@example.com"}}',
        '{"tool": "cancel_order", "arguments": {"order_id": "W1007", "reason": "ordered by mistake"}}',
    ]))  # fmt: skip
    # The next step leases a (possibly different) sandbox: the database travels in the task.
    asyncio.run(act(assistant, task, ['{"tool": "update_account_email", "arguments": {"account_id": "A103", "new_email": "d.okafor@example.org"}}']))
    tool_msgs = [m for m in task.state["messages"] if m["role"] == "tool"]
    assert json.loads(tool_msgs[0]["content"]) == {"ok": True, "result": {"account_id": "A103", "name": "David Okafor"}}
    assert json.loads(tool_msgs[1]["content"])["result"]["status"] == "cancelled"
    assert task.state["db"]["orders"]["W1007"]["status"] == "cancelled"
    result = evaluate(task, pool_params)
    assert result["reward"] == 1.0 and result["db_changed"] and result["tool_calls"] == 3
    assert all(e["ok"] and e["exit_code"] == 0 and e["duration_s"] > 0 for e in result["tool_execs"])
    calls_in_trajectory = [m for m in result["trajectory"] if m.get("tool_calls")]
    assert calls_in_trajectory[0]["tool_calls"][0]["function"]["name"] == "find_account_by_email"
    stats = ray.get(ray.get_actor(pool_actor_name("tool-use-test-pool")).stats.remote())
    assert stats.execs >= 3 and stats.leased == 0


def test_refused_and_wrong_actions_are_graded(pool_params: dict[str, Any]) -> None:
    assistant = Assistant(ctx("assistant", pool_params))
    refused = new_task("shop-02")  # shipped order: the right outcome is no change
    asyncio.run(act(assistant, refused, ['{"tool": "cancel_order", "arguments": {"order_id": "W1003", "reason": "no longer needed"}}']))
    assert "only pending orders" in refused.state["messages"][-1]["content"]
    assert evaluate(refused, pool_params)["reward"] == 1.0

    wrong = new_task("shop-01")  # should cancel W1001, refunds W1002 instead
    asyncio.run(act(assistant, wrong, ['{"tool": "refund_order", "arguments": {"order_id": "W1002", "amount": 10, "reason": "x"}}']))
    result = evaluate(wrong, pool_params)
    assert result["reward"] == 0.0 and result["db_changed"]
    assert metrics([{"status": "ok", "result": result}, {"status": "failed", "result": None}])["mean_reward"] == 0.0


def test_a_tool_that_crashes_or_hangs_is_a_tool_error_not_a_task_failure(pool_params: dict[str, Any]) -> None:
    params = {**pool_params, "sandbox": {**pool_params["sandbox"], "limits": {"wall_s": 1.0}}}
    assistant = Assistant(ctx("assistant", params))
    task = new_task("shop-09")

    async def scenario() -> None:
        async with contextlib.AsyncExitStack() as stack:
            env = await assistant.open_env(stack, task)
            await env.session.write_file("tools.py", "import time\ntime.sleep(60)\n")  # a hanging tool
            answer = await env.call(ToolCall("c1", "get_order", {"order_id": "W1006"}))
            assert json.loads(answer) == {"ok": False, "error": "the tool failed: killed (wall)"}
            assert env.execs[0].killed_reason == "wall"

    asyncio.run(scenario())


def test_user_simulator_rejects_a_bad_scenario_without_llm_call() -> None:
    sim = UserSim(AgentContext("user", {}, None, 16, 0.0))
    task = Task(id="bad", row={"id": "bad", "user": {"name": "X"}, "expected_actions": []}, next_role="user")
    asyncio.run(sim.step(task))
    assert task.error is not None and task.error.kind == "bad_input" and "'user'" in task.error.message


def test_an_idle_pool_exits_and_the_next_step_starts_a_new_one(pool_params: dict[str, Any]) -> None:
    sandbox = {**pool_params["sandbox"], "size": 1, "idle_exit_s": 1.0, "liveness_interval_s": 0.2}
    params = {**pool_params, "sandbox_pool": "tool-use-idle-pool", "sandbox": sandbox}
    assistant = Assistant(ctx("assistant", params))
    old = assistant.pool()
    ray.get(old.ready.remote())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the pool exits by itself once idle
        try:
            ray.get(old.stats.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the idle pool did not exit")
    task = new_task("shop-09")
    asyncio.run(act(assistant, task, ['{"tool": "get_order", "arguments": {"order_id": "W1006"}}']))
    assert json.loads(task.state["messages"][-1]["content"])["result"]["status"] == "delivered"
    assert assistant.pool() is not old
    new = assistant.pool()
    ray.get(new.shutdown.remote())
    ray.kill(new)
