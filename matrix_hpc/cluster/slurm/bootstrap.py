"""The per-node entry point of a Slurm run, and its application layer: what to run, when to requeue.

``srun python -m matrix_hpc.cluster.slurm.bootstrap CONFIG [key=value ...]`` (what
``sbatch/matrix_hpc.sbatch`` and ``matrix-hpc submit`` launch, one task per node). The
node layer below (``node.py``: the Ray node, the rendezvous, the watch on rank 0) forms the
cluster; this module:

* checks the workflow's code on every node (a typo ends the job before any Ray node starts);
* installs the stop signals (``matrix_hpc/stopsignals.py``: INT, TERM and USR2 mean the same
  in every process) and reads why a stop came (``stopcause.py``: the time limit, a
  preemption, a requeue, a cancel), which the run records in ``run.json``;
* on rank 0, drives the run (:func:`~matrix_hpc.job.run_job`). On USR2 (time limit near, or
  preemption): stop intake, let tasks in flight finish for ``run.stop_grace_s`` (a TERM cuts
  that to 0: the KILL follows within KillWait), commit, and requeue the job at once
  (:class:`RequeuePolicy`), before any slow work (service shutdown, status calls, summaries),
  since the KILL is near; the requeued job resumes from the store. Past
  ``cluster.slurm.max_requeues`` it does not: the job ends failed;
* on every other rank, serves (:meth:`~.node.SlurmNode.serve`) until rank 0 says the run is over.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ...config import ConfigError, load_config
from ...job import run_job
from ...runtime.loader import check_workflow_code
from ...runtime.runner import RunProgress
from ...runtime.team import TeamError
from ...stopsignals import StopSignals
from .jobs import job_layout, record_job
from .node import NodeEnv, SlurmNode, scontrol_requeue
from .nodecheck import SharedPathError
from .stopcause import StopCause

__all__ = ["RequeuePolicy", "main", "run_node"]

log = logging.getLogger(__name__)


class RequeuePolicy:
    """Called by the job once the store is saved: on a USR2 under Slurm, requeue now.

    It runs before the services stop and before the summaries are read from the
    store, so the time from USR2 to ``scontrol requeue`` is the grace for tasks in
    flight plus one commit, whatever the size of the store (it is logged). A TERM first
    (``scancel``, ``scontrol requeue``): Slurm is ending or requeueing the job itself.
    """

    def __init__(self, node: NodeEnv, max_requeues: int, signals: StopSignals, say: Callable[[str], None]) -> None:
        self.node, self.max_requeues, self.signals, self.say = node, max_requeues, signals, say
        self.refused = False

    def __call__(self, progress: RunProgress) -> None:
        if progress.finished or self.signals.reason != "SIGUSR2" or "SLURM_JOB_ID" not in os.environ:
            return
        if self.node.restart >= self.max_requeues:
            self.say(f"not requeued: restart {self.node.restart} reached cluster.slurm.max_requeues")
            self.refused = True
            return
        since = time.monotonic() - (self.signals.at or time.monotonic())
        why = self.signals.settled_cause(0.0)
        if scontrol_requeue(self.node.job_id):
            by = f" ({why.replace('_', ' ')})" if why and why != "SIGUSR2" else ""
            self.say(f"requeued job {self.node.job_id} {since:.2f}s after SIGUSR2{by}; it resumes from the store")
        log.info("USR2 to scontrol requeue: %.3fs", since)


def run_node(config_path: str, overrides: list[str], node_type: str = "both") -> int:
    """Run this node's part of the job; returns the process exit status."""
    config = load_config(config_path, overrides)
    check_workflow_code(config)  # on every node: a typo ends the job here, before any Ray node starts
    slurm = config.cluster.slurm
    output = Path(config.output.path).expanduser().resolve()
    causes: list[StopCause] = []  # rank 0's, once it knows it is rank 0

    def on_first(name: str) -> None:  # on a thread of its own: reads the job's record
        signals.cause = causes[0](name) if causes else name

    signals = StopSignals(grace_s=config.run.stop_grace_s, on_first=on_first)
    with SlurmNode(slurm, output, job_layout(config), node_type) as node:
        if node.env.rank == 0:
            causes.append(StopCause(slurm.signal_lead_s))
        node.check_shared_path()
        if node.env.rank != 0:
            return node.serve(signals, config.run.stop_grace_s)
        if "SLURM_JOB_ID" in os.environ:
            record_job(config, node.env.job_id, "sbatch")
        config.cluster.address = node.form_cluster()
        requeue = RequeuePolicy(node.env, slurm.max_requeues, signals, node.say)
        try:
            summary = run_job(config, on_event=node.say, stop=signals, on_saved=requeue)
        except TeamError as exc:  # stalled, a role gone, the disk full: finished work is saved
            node.say(f"run failed: {exc}")
            return 1
        p = summary.progress
        node.say(
            f"run {'finished' if p.finished else 'stopped'}: {p.ok} done, {p.failed} failed this run; store {summary.store['records']} records; output {summary.output}"
        )
        if p.finished:
            return 0
        if requeue.refused:
            return 1
        return 0 if signals.reason == "SIGUSR2" else 130


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m matrix_hpc.cluster.slurm.bootstrap", description="Per-node entry point of a Slurm run (one task per node).")
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    ap.add_argument("--node-type", choices=["both", "gpu", "cpu"], default="both", help="what this node hosts: services (gpu), agents (cpu) or both")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_node(args.config, args.overrides, args.node_type)
    except SharedPathError as exc:
        print(f"matrix-hpc: {exc}", file=sys.stderr, flush=True)
        return 2
    except ConfigError as exc:
        print(f"matrix-hpc: config error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C (srun forwards it)
        print("matrix-hpc: aborted; committed work is kept, re-run to resume", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
