"""A workflow outside the repo runs on a 2-node Slurm job with PYTHONPATH unset.

The job runs ``sbatch sbatch/matrix_hpc.sbatch`` from the repo root (so every node's
``python -m`` bootstrap, and Ray's workers, take matrix_hpc from this checkout); the
workflow's own module is found on every node only through ``workflow.python_path``
(the config's folder, here on a filesystem both nodes see). The entry role's
``setup()`` runs a Ray task defined in that module on each node.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .conftest import store_records
from .slurm_cluster import SlurmCluster, missing_binaries
from .test_slurm_run import DONE, _empty_cluster, env_for, job_log, sbatch  # noqa: F401 (the per-test reset)
from .test_workflow_outside_repo import KINDS, workflow_folder

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing_binaries()), reason=f"Slurm not installed (make test installs: {missing_binaries()})"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the test Slurm cluster runs slurmd as root"),
]


def test_workflow_outside_repo_runs_on_every_node_without_pythonpath(cluster: SlurmCluster, tmp_path: Path) -> None:
    cfg = workflow_folder(tmp_path)
    env = {k: v for k, v in env_for(cluster).items() if k != "PYTHONPATH"}
    job = sbatch(cluster, cfg, env=env)
    info = cluster.wait_job(job, DONE, 300)
    log = job_log(cfg, job)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    records = {r["id"]: r for r in store_records(tmp_path / "out")}
    assert len(records) == len(KINDS)
    ok = [records[f"r{i}"] for i, k in enumerate(KINDS) if k == "ok"]
    assert all(r["status"] == "ok" and r["result"]["nodes"] == ["n1", "n2"] for r in ok), [r["result"] for r in ok]
    assert sum(r["status"] == "failed" and r["error"]["kind"] == "routing" for r in records.values()) == KINDS.count("forget")


def test_misspelled_agent_class_ends_the_job_before_ray_starts(cluster: SlurmCluster, tmp_path: Path) -> None:
    cfg = workflow_folder(tmp_path, agent_class="Ruoter")
    job = sbatch(cluster, cfg)
    info = cluster.wait_job(job, DONE, 120)
    log = job_log(cfg, job)
    assert info["JobState"] == "FAILED", log[-3000:]
    line = "matrix-hpc: config error: workflow.roles.router.agent: module 'contract_agents' has no attribute 'Ruoter' (did you mean 'Router'?)"
    assert log.count(line) == 2, log[-3000:]  # from each node's bootstrap
    assert not list((tmp_path / "out").glob("slurm/logs/ray-*")), "a Ray node was started"
