"""The per-node entry point of a Slurm run: every node of the allocation runs it.

``srun python -m matrix_hpc.cluster.slurm.bootstrap CONFIG [key=value ...]`` (what
``sbatch/matrix_hpc.sbatch`` and ``matrix-hpc submit`` launch, one task per node):

* every node first checks that it sees the same ``output.path`` (a probe file each;
  one line naming the node that cannot, see ``nodecheck.py``);
* rank 0 starts the Ray head on free ports with a per-job temp dir, publishes its
  address (MPI broadcast under MPI, else a file in the job directory), waits for
  every node, then drives the run itself;
* every other rank joins the head, connects to rank 0's lifeline (``lifeline.py``) and
  serves until rank 0 says the run is over on it: rank 0 tells every rank and waits for
  their acknowledgements before its head stops, so no rank mistakes the end for a lost
  head (a ``done`` file can stay hidden by NFS's lookup cache);
* SIGUSR2 (time limit near, or preemption) on rank 0: stop intake, let tasks in
  flight finish for ``run.stop_grace_s`` (SIGTERM: abandon them at once, the KILL
  follows within KillWait), commit, and requeue the job at
  once, before any slow work (service shutdown, status calls, summaries), since the
  KILL is near; the requeued job resumes from the store. Each node stops only its
  own Ray, by process group, and removes its Ray temp dir (``/tmp/mhpc-<job>.<restart>``,
  node-local) at the end of each life; one left by a killed life is removed when the
  job next starts there;
* a worker node that cannot reach the head for ``cluster.slurm.head_lost_s`` before the
  run is over requeues the job (the head node died; ``--no-kill`` keeps the job alive);
  one whose lifeline closes with no ``done`` (the driver was SIGKILLed, OOM-killed,
  crashed) requeues it at once. Past ``cluster.slurm.max_requeues`` it does not: the job
  ends failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...config import ConfigError, load_config
from ...credentials import remove_secret, wait_secret
from ...labels import NODE_IP_ENV, node_resources
from ...store.fsutil import atomic_write_json
from ..auth import RayAuth, new_ray_token
from .jobs import job_layout, record_job
from .lifeline import DriverLink, Lifeline
from .nodecheck import SharedPathError, cleanup_temp_dirs, node_local_locks, probe_shared_path
from .ports import pick_ports
from .raynode import RayNode
from .rendezvous import Rendezvous, mpi_world, under_mpi

__all__ = ["NodeEnv", "main", "run_node"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeEnv:
    """Where this process sits in the allocation."""

    job_id: str
    restart: int
    rank: int
    size: int
    node_ip: str
    hostname: str

    @classmethod
    def detect(cls, rendezvous: str) -> NodeEnv:
        env = os.environ
        job_id = env.get("SLURM_JOB_ID") or f"local{os.getpid()}"
        restart = int(env.get("SLURM_RESTART_COUNT") or 0)
        if rendezvous == "mpi" or (rendezvous == "auto" and under_mpi()):
            comm = mpi_world()  # under mpirun the Slurm task ids are those of the batch step
            rank, size = comm.Get_rank(), comm.Get_size()
        else:
            rank, size = int(env.get("SLURM_PROCID", "0")), int(env.get("SLURM_NTASKS", "1"))
        hostname = socket.gethostname()
        node_ip = env.get(NODE_IP_ENV) or socket.gethostbyname(hostname)
        return cls(job_id, restart, rank, size, node_ip, hostname)

    @property
    def key(self) -> str:
        """Unique per life of the job: a requeued job must not meet its previous head."""
        return f"{self.job_id}.{self.restart}"


def _wait_for_nodes(address: str, n: int, timeout_s: float) -> list[dict[str, Any]]:
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
            break
        except ConnectionError:  # the head's raylet not registered yet (a loaded node is slow)
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)
    try:
        while True:
            alive = [nd for nd in ray.nodes() if nd.get("Alive")]
            if len(alive) >= n:
                return [{"ip": nd["NodeManagerAddress"], "hostname": nd.get("NodeManagerHostname"), "resources": nd.get("Resources", {})} for nd in alive]
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(alive)} of {n} nodes joined the Ray cluster in {timeout_s:.0f}s")
            time.sleep(0.5)
    finally:
        ray.shutdown()


_MAX_JOINS = 3


class _HeadWatch:
    """Whether the Ray head (its GCS port) has been unreachable for ``lost_after_s`` seconds."""

    def __init__(self, address: str, lost_after_s: float, every_s: float = 2.0) -> None:
        host, _, port = address.rpartition(":")
        self.addr, self.lost_after_s, self.every_s = (host, int(port)), lost_after_s, every_s
        self._since: float | None = None
        self._next = 0.0

    def _reachable(self) -> bool:
        try:
            with socket.create_connection(self.addr, timeout=min(self.every_s, 2.0)):
                return True
        except OSError:
            return False

    def lost(self, wait: bool = False) -> bool:
        """Checks at most every ``every_s``; ``wait``: keep checking until decided (reachable, or lost)."""
        while True:
            now = time.monotonic()
            if now >= self._next:
                self._next = now + self.every_s
                if self._reachable():
                    self._since = None
                    return False
                self._since = self._since or now
            if self._since is not None and now - self._since >= self.lost_after_s:
                return True
            if not wait:
                return False
            time.sleep(0.5)


def _requeue(job_id: str) -> bool:
    res = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if res.returncode != 0:  # e.g. Slurm is already requeueing it after a preemption
        log.warning("scontrol requeue %s: %s", job_id, res.stderr.strip())
    return res.returncode == 0


class _Requeue:
    """Called by the job once the store is saved: on a USR2 under Slurm, requeue now.

    It runs before the services stop and before the summaries are read from the
    store, so the time from USR2 to ``scontrol requeue`` is the grace for tasks in
    flight plus one commit, whatever the size of the store (it is logged).
    """

    def __init__(self, node: NodeEnv, max_requeues: int, signals: _Signals, say: Any) -> None:
        self.node, self.max_requeues, self.signals, self.say = node, max_requeues, signals, say
        self.refused = False

    def __call__(self, progress: Any) -> None:
        if progress.finished or self.signals.reason != "SIGUSR2" or "SLURM_JOB_ID" not in os.environ:
            return
        if self.node.restart >= self.max_requeues:
            self.say(f"not requeued: restart {self.node.restart} reached cluster.slurm.max_requeues")
            self.refused = True
            return
        since = time.monotonic() - (self.signals.at or time.monotonic())
        if _requeue(self.node.job_id):
            self.say(f"requeued job {self.node.job_id} {since:.2f}s after SIGUSR2; it resumes from the store")
        log.info("USR2 to scontrol requeue: %.3fs", since)


class _Signals:
    """The run's stop flag, set by USR2/TERM/INT; the first signal's name is the reason.

    USR2 is Slurm's early warning (``--signal``, preemption with GraceTime): tasks in
    flight get ``run.stop_grace_s``. TERM or INT means a KILL follows within
    KillWait seconds (``scontrol requeue``, ``scancel``, the end of GraceTime):
    abandon what is in flight and save at once (``grace_s`` = 0).
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: str | None = None
        self.at: float | None = None
        """``time.monotonic()`` of the first signal."""
        self.grace_s = float("inf")
        self.terminating = False
        """A TERM or INT came (even after a USR2): Slurm is ending or requeueing the job itself."""
        for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on)

    def is_set(self) -> bool:
        return self._event.is_set()

    def _on(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if signum != signal.SIGUSR2:
            self.grace_s, self.terminating = 0.0, True
        if not self._event.is_set():
            self.reason, self.at = name, time.monotonic()
            what = "finishing what is in flight" if signum == signal.SIGUSR2 else "abandoning what is in flight"
            print(f"{name}: stopping intake, {what}, saving", file=sys.stderr, flush=True)
        self._event.set()


def node_gpus(configured: int) -> int | None:
    """GPUs this node's Ray advertises: what Slurm gave the job step, else ``cluster.slurm.gpus_per_node``.

    None (Ray detects them) when neither says. Stating the count lets LLM replicas be placed
    by the GPUs they need even where Ray cannot see devices (logical GPUs on test nodes).
    """
    on_node = os.environ.get("SLURM_GPUS_ON_NODE", "").strip()
    if on_node.isdigit():
        return int(on_node)
    return configured or None


def _requeue_or_fail(node: NodeEnv, max_requeues: int, say: Any, output: Path) -> int:
    """This life cannot go on (rank 0's driver or node is gone): requeue the job so the next life
    resumes from the store, or, with ``max_requeues`` used up, let it fail."""
    if "SLURM_JOB_ID" not in os.environ:
        return 1
    if node.restart >= max_requeues:
        say(f"not requeued: restart {node.restart} reached cluster.slurm.max_requeues ({max_requeues}); the job ends failed")
    elif _requeue(node.job_id):
        say(f"requeued job {node.job_id}; it resumes from {output}")
    return 1


def _serve_worker(
    node: NodeEnv, head: dict[str, Any], rdv: Rendezvous, ray_node: RayNode, num_gpus: int | None,
    slurm: Any, stop_grace_s: float, signals: _Signals, say: Any, output: Path,
) -> int:  # fmt: skip
    """A rank other than 0: join the head, then serve until rank 0 says the run is over (its
    lifeline, else the ``done`` file). The driver dead (its lifeline closed with no ``done``):
    requeue at once. The head node unreachable for ``head_lost_s``: requeue."""
    link: DriverLink | None = None
    if head.get("lifeline"):
        try:
            link = DriverLink(head["lifeline"], head.get("lifeline_token", ""), node.rank)
        except ConnectionRefusedError:  # rank 0 ended (or died) before this node joined: nothing to serve
            say(f"rank 0 on {head.get('host', '?')} has ended before this node joined (see its log)")
            return 1
        except OSError as exc:  # its node does not answer: the head watch below decides
            say(f"warning: rank 0's lifeline {head['lifeline']} unreachable ({exc}); watching the Ray head only")
    ray_node.start(head["address"], num_gpus=num_gpus)
    say(f"joined the Ray head at {head['address']} (rendezvous by {head['via']})")
    give_up: float | None = None
    head_watch = _HeadWatch(head["address"], slurm.head_lost_s)
    joins = 1
    state = "running"
    try:
        while not rdv.finished() and not head_watch.lost():
            state = link.poll() if link is not None else "running"
            if state in ("done", "dead"):
                break
            if not ray_node.alive():
                # Ray gives a node 30 s to register; a loaded node misses it. Join again:
                # the run needs this node to form, and takes it back if it formed already.
                if signals.is_set() or joins >= _MAX_JOINS:
                    break
                say(f"Ray on this node exited (see {ray_node.log_path}); joining the head again")
                ray_node.stop()
                ray_node.start(head["address"], num_gpus=num_gpus)
                joins += 1
            if signals.terminating and give_up is None:
                give_up = time.monotonic() + stop_grace_s + 15  # let rank 0 save first
            if give_up is not None and time.monotonic() > give_up:
                break
            time.sleep(0.5)
    finally:
        if link is not None:
            link.close()
    stopping = signals.terminating  # Slurm is ending or requeueing the job itself: no requeue from here
    if state == "done" or give_up is not None or rdv.finished() or (state == "dead" and stopping):
        return 0
    if state == "dead":
        # SIGKILL, the OOM killer, a segfault: the Ray head may live on (it escapes the job's process
        # tracking on some sites) and nothing else would ever end this life.
        say(f"the driver on rank 0 ({head.get('host', '?')}) died before the run ended: its lifeline closed with no 'done'")
        return _requeue_or_fail(node, slurm.max_requeues, say, output)
    if head_watch.lost(wait=True):
        # The head node died. Under --no-kill Slurm keeps the job running without it
        # (and without its batch script): requeue it here so the next life resumes.
        say(f"the head node {head.get('host', '?')} ({head['address']}) is unreachable for {slurm.head_lost_s:.0f}s: the run cannot go on")
        return 1 if stopping else _requeue_or_fail(node, slurm.max_requeues, say, output)
    return 0


def run_node(config_path: str, overrides: list[str], node_type: str = "both") -> int:
    """Run this node's part of the job; returns the process exit status."""
    config = load_config(config_path, overrides)
    from ...runtime.loader import check_workflow_code  # the runtime sits above the cluster layer

    check_workflow_code(config)  # on every node: a typo ends the job here, before any Ray node starts
    slurm = config.cluster.slurm
    node = NodeEnv.detect(slurm.rendezvous)
    jobs = job_layout(config)
    # Ray's token for this life: a 0600 file in the job's directory, written by rank 0 before its
    # head starts; every node's Ray and this process (rank 0's driver) read it (cluster/auth.py).
    token_file = jobs.ray_token(node.key)
    RayAuth(token_path=token_file)
    rdv = Rendezvous(jobs.rendezvous(node.key), node.rank, node.size, slurm.rendezvous)
    kinds = ({"gpu", "cpu"} if node_type == "both" else {node_type}) | ({"head"} if node.rank == 0 else set())
    cleanup_temp_dirs(node.job_id, node.restart, keep_current=True)
    # Rank 0's lifeline port is taken first, so the Ray worker ports picked next avoid it.
    lifeline = Lifeline(node.node_ip) if node.rank == 0 and node.size > 1 else None
    ray_node = RayNode(
        node.node_ip, pick_ports(node.node_ip, avoid={lifeline.port} if lifeline else set()), node_resources(kinds), f"/tmp/mhpc-{node.key}",
        jobs.ray_log(node.key, node.rank),
    )  # fmt: skip
    num_gpus = node_gpus(slurm.gpus_per_node) if "gpu" in kinds else None
    signals = _Signals()

    def say(msg: str) -> None:
        print(f"[rank {node.rank} {node.hostname}] {msg}", file=sys.stderr, flush=True)

    output = Path(config.output.path).expanduser().resolve()
    probe: Path | None = None
    try:
        probe = probe_shared_path(output, node.key, node.rank, node.size, node.hostname, slurm.fs_probe_timeout_s)
        local_locks = node_local_locks(output)
        if local_locks and node.rank == 0:
            say(f"warning: output.path {output}: {local_locks}, so file locks hold on one node only: "
                "nothing stops a second run on another node from writing the same store")  # fmt: skip
        if node.rank != 0:
            head = rdv.exchange(None, slurm.join_timeout_s)
            wait_secret(token_file, slurm.fs_probe_timeout_s)  # Ray aborts on a token file it cannot read
            return _serve_worker(node, head, rdv, ray_node, num_gpus, slurm, config.run.stop_grace_s, signals, say, output)

        t0 = time.time()
        if "SLURM_JOB_ID" in os.environ:
            record_job(config, node.job_id, "sbatch")
        new_ray_token(token_file, jobs.ray_tokens(node.job_id))
        ray_node.start(num_gpus=num_gpus)
        ray_node.wait_head_ready()
        published = {
            "address": ray_node.address,
            "host": node.hostname,
            **({"lifeline": lifeline.address, "lifeline_token": lifeline.token} if lifeline else {}),
        }
        head = rdv.exchange(published, slurm.join_timeout_s)
        nodes = _wait_for_nodes(ray_node.address, node.size, slurm.join_timeout_s)
        atomic_write_json(
            jobs.cluster_file(node.key), {"address": ray_node.address, "via": head["via"], "nodes": nodes, "formed_in_s": time.time() - t0}, durable=False
        )
        say(f"Ray cluster of {len(nodes)} node(s) at {ray_node.address} formed in {time.time() - t0:.1f}s (rendezvous by {head['via']})")
        config.cluster.address = ray_node.address

        from ...job import run_job  # the job layer sits above the cluster layer
        from ...runtime.team import TeamError

        requeue = _Requeue(node, slurm.max_requeues, signals, say)
        try:
            summary = run_job(config, on_event=say, stop=signals, on_saved=requeue)
        except TeamError as exc:  # stalled, a role gone, the disk full: finished work is saved
            say(f"run failed: {exc}")
            return 1
        p = summary.progress
        say(
            f"run {'finished' if p.finished else 'stopped'}: {p.ok} done, {p.failed} failed this run; store {summary.store['records']} records; output {summary.output}"
        )
        if p.finished:
            return 0
        if requeue.refused:
            return 1
        return 0 if signals.reason == "SIGUSR2" else 130
    finally:
        if node.rank == 0:
            rdv.finish()  # for a rank still waiting for the head's address
            if lifeline is not None:  # every rank is told before the head goes away
                try:
                    lifeline.end()
                except Exception:  # never keep the head from stopping
                    log.exception("lifeline: telling the ranks the run is over failed")
            if probe is not None:
                shutil.rmtree(probe, ignore_errors=True)
        ray_node.stop()
        cleanup_temp_dirs(node.job_id, node.restart, keep_current=False)
        if node.rank == 0:
            remove_secret(token_file)


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


if __name__ == "__main__":
    sys.exit(main())
