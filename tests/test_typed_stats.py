"""Counters and accounts that cross a Ray call are typed values, not dicts copied with setattr
(issue 22): ``Replay.stats()`` returns a ReplayStats that adds up across a team, and
``LLMReplica.info()`` a ReplicaInfo that the registry folds into an EndpointStatus."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
from pathlib import Path

import ray

from matrix_hpc.config import EmbeddedEngineConfig
from matrix_hpc.runtime.replay import Replay, ReplayStats
from matrix_hpc.services.llm import ChatResult
from matrix_hpc.services.llm.replica import LLMReplica, ReplicaSpec
from matrix_hpc.services.llm.status import EndpointStatus, ReplicaInfo
from matrix_hpc.store.call_journal import CallJournal

from .conftest import private_ray


def test_replay_stats_are_typed_and_add_up_across_incarnations(tmp_path: Path) -> None:
    journal = CallJournal(tmp_path, "r1", fsync=False)
    res = ChatResult(text="hi", prompt_tokens=3, completion_tokens=2, latency_s=0.5, endpoint="http://e", model="m")

    async def incarnation(name: str, calls: int) -> ReplayStats:
        segment = journal.open_segment(name, 0, "0")
        replay = Replay(segment)
        for i in range(calls):
            replay.record(f"{name}-{i}", "t1", res, 1.0)
        await segment.flush()
        assert replay.lookup(f"{name}-0") is not None and replay.lookup("nothing") is None
        stats = replay.stats()
        await segment.close()
        return stats

    a, b = asyncio.run(incarnation("a", 2)), asyncio.run(incarnation("b", 3))
    assert isinstance(a, ReplayStats) and (a.entries, a.hits, a.misses, a.saved_tokens) == (2, 1, 1, 5)
    total = sum([a, b], ReplayStats())
    assert (total.entries, total.hits, total.misses, total.saved_s) == (5, 2, 2, 1.0)
    assert total.bytes == a.bytes + b.bytes > 0 and total.disabled is None
    assert (a + dataclasses.replace(b, disabled="disk full")).disabled == "disk full"


def test_every_replica_field_has_its_place_in_the_endpoint_status() -> None:
    status = {f.name for f in dataclasses.fields(EndpointStatus)}
    assert {f.name for f in dataclasses.fields(ReplicaInfo)} - status == {"index"}  # the status's ``replica``


def test_a_replica_reports_a_typed_info_that_the_endpoint_status_takes(tmp_path: Path) -> None:
    with private_ray("typed-info", num_cpus=1):
        spec = ReplicaSpec("embedded", "default", str(tmp_path / "logs"), EmbeddedEngineConfig(n_parallel=1, threads=1), 60.0, model_key="m")
        replica = LLMReplica.options(num_cpus=0).remote(spec, 3)
        info = ray.get(replica.info.remote(), timeout=120)  # not started: no server yet
        assert isinstance(info, ReplicaInfo)
        assert (info.index, info.kind, info.url, info.starts, info.alive) == (3, "embedded", None, 0, False)
        assert info.host == socket.gethostname() and info.actor_pid != os.getpid() and info.node_id
        row = EndpointStatus("m", "http://127.0.0.1:1/v1", 3).with_replica(info)
        assert (row.url, row.replica, row.kind, row.actor_pid, row.node_id, row.host) == (
            "http://127.0.0.1:1/v1", 3, "embedded", info.actor_pid, info.node_id, info.host,
        )  # fmt: skip
        assert row.to_dict()["actor_pid"] == info.actor_pid  # run.json's form is flat, as before
        ray.kill(replica)
