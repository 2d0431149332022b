"""The schedulers matrix-hpc is measured against, running the *same* agent code.

* ``batch_sync``: take B tasks, run every task's current step, wait for all of
  them, repeat until the batch is finished, then take the next B (how the original
  Collaborative Reasoner and many generation scripts work).
* ``central``: one driver asyncio loop owns every task and awaits each step
  (agents as plain calls, at most B tasks at once): row-level, but one process.
* ``ray_data``: Ray Data ``map_batches``, one stage per role, batches of B rows
  stream between stages; each stage waits for its whole batch (the paper's
  web-reasoning baseline). Only for workflows whose roles form a fixed pipeline.

Each returns the finished tasks; the harness writes them to a store like ours.
"""

from __future__ import annotations

import asyncio
import pickle
import time
from collections.abc import Awaitable, Callable
from typing import Any

from matrix_hpc.agents import Agent, AgentContext, Task
from matrix_hpc.config import JobConfig, resolve_sampling
from matrix_hpc.runtime.actor import load_object
from matrix_hpc.runtime.agent import run_step
from matrix_hpc.services.llm import ChatClient

__all__ = ["build_agents", "run_batch_sync", "run_central", "run_ray_data"]


def build_agents(config: JobConfig, base_url: str) -> tuple[dict[str, Agent], ChatClient]:
    name, llm = next(iter(config.models.items()))  # the baselines serve one model
    client = ChatClient([base_url], llm.served_name, None, llm.timeout_s, llm.max_retries, llm.retry_backoff_s, max_connections=4096)
    agents = {}
    for role, rc in config.workflow.roles.items():
        cls = load_object(rc.agent)
        sampling = resolve_sampling(llm, rc.sampling)
        ctx = AgentContext(role, {**config.workflow.params, **rc.params}, client if cls.uses_llm else None, sampling, sandbox=config.sandbox, model=name)
        agents[role] = cls(ctx)
    return agents, client


async def _step(agents: dict[str, Agent], task: Task) -> None:
    """One step, through the same contract as the runtime's actor host."""
    role = task.next_role
    assert role is not None
    await run_step(agents[role], task, role, agents)


Finished = list[tuple[Task, float]]  # each task with the wall time it finished


async def _batch_sync(agents: dict[str, Agent], tasks: list[Task], batch: int) -> Finished:
    out: Finished = []
    for lo in range(0, len(tasks), batch):
        active = tasks[lo : lo + batch]
        started = time.time()
        for t in active:
            t.created_at = started
        while active:
            await asyncio.gather(*(_step(agents, t) for t in active))
            now = time.time()
            out.extend((t, now) for t in active if t.done)
            active = [t for t in active if not t.done]
    return out


async def _central(agents: dict[str, Agent], tasks: list[Task], limit: int) -> Finished:
    sem = asyncio.Semaphore(limit)
    out: Finished = []

    async def one(task: Task) -> None:
        async with sem:
            task.created_at = time.time()
            while not task.done:
                await _step(agents, task)
            out.append((task, time.time()))

    await asyncio.gather(*(one(t) for t in tasks))
    return out


def _with_agents(config: JobConfig, base_url: str, schedule: Callable[[dict[str, Agent]], Awaitable[Finished]]) -> Finished:
    async def main() -> Finished:
        agents, client = build_agents(config, base_url)
        try:
            return await schedule(agents)
        finally:
            await client.close()

    return asyncio.run(main())


def run_batch_sync(config: JobConfig, base_url: str, tasks: list[Task], batch: int) -> Finished:
    return _with_agents(config, base_url, lambda agents: _batch_sync(agents, tasks, batch))


def run_central(config: JobConfig, base_url: str, tasks: list[Task], limit: int) -> Finished:
    return _with_agents(config, base_url, lambda agents: _central(agents, tasks, limit))


class _Stage:
    """A Ray Data stage: runs one role's step for every row of a batch, waits for all."""

    def __init__(self, config: JobConfig, base_url: str, role: str) -> None:
        self.role = role
        self.loop = asyncio.new_event_loop()
        self.agents, self.client = build_agents(config, base_url)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        tasks = [pickle.loads(b) for b in batch["task"]]
        done_at = list(batch["done_at"])
        mine = [t for t in tasks if t.next_role == self.role]

        async def run_batch() -> None:  # Ray Data calls from a worker thread: gather inside our loop
            await asyncio.gather(*(_step(self.agents, t) for t in mine))

        self.loop.run_until_complete(run_batch())
        now = time.time()
        for i, t in enumerate(tasks):
            if t.done and not done_at[i]:
                done_at[i] = now
        return {"task": [pickle.dumps(t) for t in tasks], "done_at": done_at}


def run_ray_data(config: JobConfig, base_url: str, tasks: list[Task], batch: int, stages: list[str]) -> Finished:
    """Requires Ray to be initialised by the caller."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    started = time.time()
    for t in tasks:
        t.created_at = started  # rows enter the pipeline together
    ds = ray.data.from_items([{"task": pickle.dumps(t), "done_at": 0.0} for t in tasks])
    for role in stages:
        ds = ds.map_batches(_Stage, fn_constructor_args=(config, base_url, role), batch_size=batch, concurrency=1, num_cpus=0.1, batch_format="numpy")
    return [(pickle.loads(row["task"]), float(row["done_at"]) or time.time()) for row in ds.iter_rows()]
