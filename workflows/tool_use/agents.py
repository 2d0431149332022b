"""Tool use (tau2-bench style): a simulated customer, a support assistant with tools, a grader.

Flow: user → assistant → user → … → evaluator. The user simulator (LLM) plays the
scenario's customer and ends with ``###STOP###``; the assistant (LLM) follows the
shop policy and calls tools, each call run in a sandbox leased for that step from
the node's pool; the evaluator (no LLM) replays the scenario's expected actions on
the starting database and gives reward 1.0 when the final database matches.

The database travels in the task (``state["db"]``), so no sandbox is held between
steps: a step that calls tools leases one, loads the database, runs the calls and
reads the database back, and the lease never outlives the actor that holds it.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import ray

from matrix_hpc.agents import Agent, AgentContext, Task
from matrix_hpc.services.sandbox import SandboxError, SandboxLimits, SandboxSession, get_or_create_pool, pool_config

from .env import tools
from .environment import SandboxToolEnv, load_base_db
from .protocol import ToolCall, from_openai, parse_text_calls, recent, render, tool_prompt, user_view

__all__ = ["POLICY", "STOP", "Assistant", "Evaluator", "UserSim", "check_row", "metrics", "start_state"]

log = logging.getLogger(__name__)

STOP = "###STOP###"
GREETING = "Hi! How can I help you today?"
POLICY = """You are the customer support assistant of an online shop. Follow this policy:
- Before changing anything, find the customer's account with their email and only act on that account's orders.
- Cancel only pending orders; the reason must be 'no longer needed' or 'ordered by mistake'.
- Change the shipping address only of pending orders.
- Refund only delivered orders, at most the order total minus earlier refunds, with a reason.
- Change an account's email when the customer asks.
- Refuse anything else politely, or transfer to a human agent.
Be brief."""


def check_row(row: dict[str, Any], base_db: dict[str, Any]) -> str | None:
    """Why a scenario row cannot run, or None."""
    user = row.get("user")
    if not isinstance(user, dict) or not all(isinstance(user.get(k), str) and user[k] for k in ("name", "email", "instructions")):
        return "field 'user' must have non-empty strings 'name', 'email' and 'instructions'"
    actions = row.get("expected_actions")
    if not isinstance(actions, list) or not all(isinstance(a, dict) and a.get("name") in tools.WRITES for a in actions):
        return f"field 'expected_actions' must be a list of {{'name', 'arguments'}} with name one of {sorted(tools.WRITES)}"
    try:
        tools.replay(base_db, actions)
    except (ValueError, TypeError, KeyError) as exc:
        return str(exc)
    return None


def start_state(task: Task) -> None:
    """A new dialogue: the assistant's greeting, no tool runs, the starting database (implicit)."""
    task.state.update(messages=[{"role": "assistant", "content": GREETING}], user_turns=0, tool_execs=[], termination=None)


@dataclass
class _Params:
    """What every role of the workflow takes (``workflow.params``)."""

    db: str | None = None
    """A JSON file of the starting database (default: the bundled one)."""
    max_turns: int = 6
    """Customer messages before the dialogue is cut."""
    evaluator: str = "evaluator"
    history_chars: int = 4000
    """Latest dialogue sent to the model: what fits its context."""


class _ToolUseAgent(Agent):
    Params = _Params

    def __init__(self, ctx: AgentContext) -> None:
        super().__init__(ctx)
        self.base_db = load_base_db(self.params.db)
        self.max_turns = self.params.max_turns
        self.evaluator = self.params.evaluator
        self.history_chars = self.params.history_chars


class UserSim(_ToolUseAgent):
    """The customer."""

    @dataclass
    class Params(_Params):
        assistant: str = "assistant"

    async def step(self, task: Task) -> None:
        st = task.state
        if "messages" not in st:
            problem = check_row(task.row, self.base_db)
            if problem:
                task.fail("bad_input", f"row {task.id}: {problem}", self.role)
                return
            start_state(task)
        if st["user_turns"] >= self.max_turns:
            st["termination"] = "max_turns"
            task.next_role = self.evaluator
            return
        user = task.row["user"]
        system = (
            f"You are {user['name']} (email {user['email']}), a customer chatting with an online shop's support assistant. "
            f"Your goal: {user['instructions']} Write one short message at a time, like a real customer. "
            f"Give your email or order id when asked. When your goal is reached or cannot be reached, reply with only {STOP}"
        )
        text = await self.chat(task, [{"role": "system", "content": system}, *recent(user_view(st["messages"]), self.history_chars)])
        st["user_turns"] += 1
        said = text.replace(STOP, "").strip()
        if said:
            st["messages"].append({"role": "user", "content": said})
        if STOP in text:
            st["termination"] = "user_stop"
            task.next_role = self.evaluator
        else:
            task.next_role = self.params.assistant


class Assistant(_ToolUseAgent):
    """The support agent; the pool's settings are the job's ``sandbox`` section (``ctx.sandbox``)."""

    @dataclass
    class Params(_Params):
        tool_calling: str = "native"
        """``native`` (the server's tool calls) or ``text`` (JSON calls in the reply)."""
        max_tool_rounds: int = 3
        """Tool-call rounds within one reply."""
        sandbox_pool: str = "tool-use-sandboxes"
        """Ray actor name prefix of the per-node pool (created on first use)."""
        acquire_wait_s: float = 60.0
        user: str = "user"

    def __init__(self, ctx: AgentContext) -> None:
        super().__init__(ctx)
        self.mode = self.params.tool_calling
        if self.mode not in ("native", "text"):
            raise ValueError(f"workflow.params.tool_calling: expected native or text, got {self.mode!r}")
        self.known = set(tools.IMPLEMENTATIONS)
        self.max_tool_rounds = self.params.max_tool_rounds
        self.pool_name = self.params.sandbox_pool
        self.pool_cfg = pool_config(ctx.sandbox)
        self.tool_limits: SandboxLimits = self.pool_cfg.limits
        self.acquire_wait_s = self.params.acquire_wait_s
        self._pool: Any = None
        system = POLICY if self.mode == "native" else f"{POLICY}\n\n{tool_prompt(tools.SCHEMAS)}"
        self.system = {"role": "system", "content": system}

    def pool(self) -> Any:
        if self._pool is None:
            self._pool = get_or_create_pool(self.pool_name, self.pool_cfg)
        return self._pool

    async def step(self, task: Task) -> None:
        try:
            await self._respond(task)
        except SandboxError as exc:
            cause = getattr(exc, "cause", exc)  # Ray wraps errors raised in the pool actor
            task.fail(getattr(cause, "kind", "sandbox_error"), f"{type(cause).__name__}: {cause}", self.role)
            return
        except ray.exceptions.RayActorError as exc:  # the pool died: the next step makes a new one
            self._pool = None
            task.fail("sandbox_error", f"sandbox pool {self.pool_name} is gone: {exc}", self.role)
            return
        task.next_role = self.evaluator if task.state.get("termination") else self.params.user

    async def _respond(self, task: Task) -> None:
        st = task.state
        extra = {"tools": tools.SCHEMAS, "tool_choice": "auto"} if self.mode == "native" else {}
        async with contextlib.AsyncExitStack() as stack:
            env: SandboxToolEnv | None = None
            for round_ in range(self.max_tool_rounds + 1):
                history = render(recent(st["messages"], self.history_chars), self.mode)
                res = await self.chat_result(task, [self.system, *history], **extra)
                calls = from_openai(res.tool_calls or [], self.known) or parse_text_calls(res.text, self.known)
                if not calls or round_ == self.max_tool_rounds:
                    st["messages"].append({"role": "assistant", "content": res.text})
                    break
                env = await self.execute(task, res.text, calls, stack, env)
                if st.get("termination"):
                    break
            if env is not None:
                await self.save(task, env)

    async def execute(self, task: Task, text: str, calls: list[ToolCall], stack: contextlib.AsyncExitStack, env: SandboxToolEnv | None) -> SandboxToolEnv:
        """Record the reply's calls and run them in the step's sandbox (leased on the first call)."""
        st = task.state
        st["messages"].append({"role": "assistant", "content": text or None, "tool_calls": [c.to_openai() for c in calls]})
        if env is None:
            env = await self.open_env(stack, task)
        for call in calls:
            answer = await env.call(call)
            st["messages"].append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": answer})
            if call.name == "transfer_to_human":
                st["termination"] = "transfer"
        return env

    async def save(self, task: Task, env: SandboxToolEnv) -> None:
        """Carry the sandbox's database and the step's tool runs on in the task."""
        task.state["db"] = await env.database()
        task.state["tool_execs"].extend(e.to_dict() for e in env.execs)

    async def open_env(self, stack: contextlib.AsyncExitStack, task: Task) -> SandboxToolEnv:
        """Lease a sandbox until ``stack`` closes (recycled if the step fails) and load the task's database."""
        try:
            session = await stack.enter_async_context(SandboxSession(self.pool(), task.id, self.acquire_wait_s))
        except ray.exceptions.RayActorError:
            # The pool exited (idle for sandbox.idle_exit_s) or died before leasing: start a new one.
            self._pool = None
            session = await stack.enter_async_context(SandboxSession(self.pool(), task.id, self.acquire_wait_s))
        env = SandboxToolEnv(session, self.tool_limits)
        await env.load(task.state.get("db") or self.base_db)
        return env


class Evaluator(_ToolUseAgent):
    """Reward: 1.0 when the final database equals the starting one after the expected actions."""

    uses_llm = False

    async def step(self, task: Task) -> None:
        st = task.state
        expected = tools.replay(self.base_db, task.row["expected_actions"])
        final = st.get("db") or self.base_db
        reward = 1.0 if tools.reward_view(final) == tools.reward_view(expected) else 0.0
        execs = st.get("tool_execs", [])
        task.finish(
            {
                "scenario": task.id,
                "termination": st.get("termination") or "unknown",
                "reward": reward,
                "trajectory": st.get("messages", []),
                "tool_execs": execs,
                "tool_calls": len(execs),
                "user_turns": st.get("user_turns", 0),
                "expected_actions": task.row["expected_actions"],
                "db_changed": tools.reward_view(final) != tools.reward_view(self.base_db),
            }
        )


def metrics(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Mean reward, termination reasons, tool calls and failures over a run's records."""
    n = failed = calls = failed_calls = 0
    reward = 0.0
    ends: Counter[str] = Counter()
    for rec in records:
        if rec["status"] != "ok":
            failed += 1
            continue
        res = rec["result"]
        n += 1
        reward += res["reward"]
        ends[res["termination"]] += 1
        calls += res["tool_calls"]
        failed_calls += sum(not e["ok"] for e in res["tool_execs"])
    return {
        "tasks": n,
        "failed": failed,
        "mean_reward": round(reward / n, 3) if n else None,
        "terminations": dict(ends),
        "tool_calls": calls,
        "tool_calls_failed": failed_calls,
    }
