"""Two models on the test Slurm cluster, placed by the GPUs their replicas need.

The test nodes have no GPUs, so each node's Ray advertises two logical ones
(``cluster.slurm.gpus_per_node: 2``). The teacher's model needs two GPUs per replica,
the student's one (two replicas): the teacher's replica must take a whole node and
both of the student's the other. ``run.json`` records where each replica ran.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import yaml

from .slurm_cluster import SlurmCluster
from .test_slurm_run import DONE, _empty_cluster, assert_each_id_once, job_log, pytestmark, sbatch, slurm_config  # noqa: F401 (the Slurm tests' reset and marks; `cluster` is conftest's)


def test_two_models_with_different_gpu_needs_are_placed_where_their_gpus_are(cluster: SlurmCluster, tmp_path: Path) -> None:
    cfg, rows = slurm_config(tmp_path, 6, "gpus", **{"cluster.slurm.gpus_per_node": 2})
    data = yaml.safe_load(cfg.read_text())
    engine = {"engine": "embedded", "max_tokens": 16, "health_interval_s": 30.0, "embedded": {"n_parallel": 2, "threads": 1}}
    data.pop("llm")
    data["models"] = {"big": {**engine, "gpus_per_replica": 2}, "small": {**engine, "gpus_per_replica": 1, "replicas": 2}}
    data["workflow"]["roles"]["teacher"]["model"] = "big"
    data["workflow"]["roles"]["student"]["model"] = "small"
    cfg.write_text(yaml.safe_dump(data))

    job = sbatch(cluster, cfg)
    info = cluster.wait_job(job, DONE, 420)
    assert info["JobState"] == "COMPLETED", job_log(cfg, job)[-4000:]
    records = assert_each_id_once(tmp_path / "gpus-out", rows)
    run = json.loads((tmp_path / "gpus-out" / "run.json").read_text())

    replicas = [e for e in run["llm"] if e["replica"] is not None]
    assert sorted((e["model"], e["gpus"], len(e["gpu_ids"])) for e in replicas) == [("big", 2, 2), ("small", 1, 1), ("small", 1, 1)], replicas
    hosts = {e["model"]: {r["host"] for r in replicas if r["model"] == e["model"]} for e in replicas}
    assert len(hosts["small"]) == 1 and hosts["big"].isdisjoint(hosts["small"]), hosts  # the big one holds a whole node
    per_host: dict[str, list[str]] = defaultdict(list)
    for e in replicas:
        per_host[e["host"]] += e["gpu_ids"]
    assert all(len(ids) == len(set(ids)) <= 2 for ids in per_host.values()), per_host  # no GPU given twice
    urls = {e["url"]: e["model"] for e in replicas}
    turns = [t for r in records for t in r["turns"] if t["endpoint"]]
    assert turns and all(urls[t["endpoint"]] == {"teacher": "big", "student": "small"}[t["role"]] for t in turns)
