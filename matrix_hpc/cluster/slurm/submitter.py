"""Submitting a run to Slurm from Python or ``matrix-hpc submit``, through submitit.

``submit(config_path)`` builds a submitit executor from ``cluster.slurm`` and
submits :class:`MatrixJob`, which runs :func:`~matrix_hpc.cluster.slurm.bootstrap.run_node`
on every node (one task per node).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ...config import JobConfig, load_config
from .bootstrap import run_node
from .jobs import job_layout, record_job

__all__ = ["MatrixJob", "make_executor", "node_results", "submit"]

log = logging.getLogger(__name__)

try:  # submitit is the optional ``slurm`` extra
    from submitit.helpers import Checkpointable as _Base
except ImportError:  # pragma: no cover - only without the extra
    _Base = object  # type: ignore[assignment,misc]


class MatrixJob(_Base):  # type: ignore[misc,valid-type]
    """The callable submitit runs on every node: one node's part of the run.

    Preemption and time limits are handled inside :func:`run_node` (USR2: stop
    intake, save, ``scontrol requeue``), the same way for ``sbatch`` and submitit.
    ``checkpoint`` (submitit's own USR2 path, used only if that handler is active)
    resubmits the same call: everything needed to resume is in the store.
    """

    def __init__(self, config_path: str, overrides: list[str] | None = None) -> None:
        self.config_path = str(Path(config_path).resolve())
        self.overrides = [*(overrides or []), "cluster.kind=slurm"]

    def __call__(self) -> int:
        return run_node(self.config_path, self.overrides)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


def make_executor(config: JobConfig) -> Any:
    """A submitit executor for ``cluster.slurm`` (homogeneous: one task per node)."""
    import submitit

    s = config.cluster.slurm
    if s.gpu_nodes and s.nodes:
        raise ValueError("cluster.slurm: a heterogeneous job (gpu_nodes and nodes) goes through sbatch/matrix_hpc_het.sbatch; submitit cannot build one")
    ex = submitit.AutoExecutor(folder=str(job_layout(config).submitit), cluster="slurm")
    params: dict[str, Any] = {
        "name": f"matrix-hpc-{config.workflow.name}",
        "nodes": s.gpu_nodes or s.nodes,
        "tasks_per_node": 1,
        "timeout_min": s.time_min,
        "slurm_signal_delay_s": s.signal_lead_s,
        # no-kill: a failed worker node leaves the job running (see sbatch/matrix_hpc.sbatch)
        "slurm_additional_parameters": {"requeue": True, "no-kill": True, **s.extra_sbatch},
        "slurm_srun_args": ["--no-kill"],
    }
    optional = {
        "slurm_partition": s.partition,
        "slurm_account": s.account,
        "slurm_qos": s.qos,
        "cpus_per_task": s.cpus_per_node,
        "mem_gb": s.mem_gb,
        "gpus_per_node": s.gpus_per_node or None,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    ex.update_parameters(**params)
    return ex


def submit(config_path: str, overrides: list[str] | None = None, executor: Any = None) -> Any:
    """Submit the run in ``config_path``; returns the submitit job. Re-submitting resumes."""
    config = load_config(config_path, overrides)
    ex = executor or make_executor(config)
    job = ex.submit(MatrixJob(config_path, overrides))
    record_job(config, str(job.job_id), "submit")
    return job


def node_results(job: Any) -> list[int | None]:
    """Each node's exit status once ``job`` has ended; None for a node that left none
    (its node died or it was killed). submitit's ``results()`` raises for such a node even
    when the run completed (``--no-kill`` keeps the job going without it): node 0 runs the
    driver, so its status is the run's."""
    from submitit.core.utils import UncompletedJobError

    job.wait()
    codes: list[int | None] = []
    for i in range(job.num_tasks):
        try:
            codes.append(int(job.task(i).result()))
        except UncompletedJobError as exc:
            log.warning("job %s, node %d left no result: %s", job.job_id, i, str(exc).splitlines()[0])
            codes.append(None)
    return codes
