"""The node layer of a Slurm life: this node's Ray, the rendezvous, and the watch on rank 0.

It knows nothing of the run (no job, no runtime): :mod:`.bootstrap`, the application
layer above it, decides what to run and when to requeue. Per life of the job
(``JOB.RESTART``), :class:`SlurmNode`:

* checks that this node sees the same ``output.path`` as the others (a probe file each;
  one line naming the node that cannot, see ``nodecheck.py``);
* on rank 0 (:meth:`SlurmNode.form_cluster`): writes the life's Ray token, starts the Ray
  head on free ports with a per-life temp dir, publishes its address and lifeline (MPI
  broadcast under MPI, else a file in the job directory) and waits for every node;
* on every other rank (:meth:`SlurmNode.serve`): joins the head, connects to rank 0's
  lifeline (``lifeline.py``) and serves until rank 0 says the run is over on it (rank 0
  tells every rank and waits for their acknowledgements before its head stops, so no rank
  mistakes the end for a lost head: a ``done`` file can stay hidden by NFS's lookup cache).
  A lifeline that closes with no ``done`` (the driver was SIGKILLed, OOM-killed, crashed)
  requeues the job at once; a head unreachable for ``cluster.slurm.head_lost_s`` before
  the run is over requeues it too (the head node died; ``--no-kill`` keeps the job alive).
  Past ``cluster.slurm.max_requeues`` it does not: the job ends failed;
* at the end (:meth:`SlurmNode.close`): stops only its own Ray, by process group, and
  removes its node-local Ray temp dir (``/tmp/mhpc-<job>.<restart>``); one left by a killed
  life is removed when the job next starts there.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...config import SlurmConfig
from ...credentials import remove_secret, wait_secret
from ...labels import NODE_IP_ENV, node_resources
from ...stopsignals import StopSignals, handlers_kept
from ...store.fsutil import atomic_write_json
from ...store.layout import JobLayout
from ..auth import RayAuth, new_ray_token
from .lifeline import DriverLink, Lifeline
from .nodecheck import cleanup_temp_dirs, node_local_locks, probe_shared_path
from .ports import pick_ports
from .raynode import RayNode
from .rendezvous import Rendezvous, mpi_world, under_mpi

__all__ = ["NodeEnv", "SlurmNode", "node_gpus", "scontrol_requeue"]

log = logging.getLogger(__name__)

_MAX_JOINS = 3


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


def node_gpus(configured: int) -> int | None:
    """GPUs this node's Ray advertises: what Slurm gave the job step, else ``cluster.slurm.gpus_per_node``.

    None (Ray detects them) when neither says. Stating the count lets LLM replicas be placed
    by the GPUs they need even where Ray cannot see devices (logical GPUs on test nodes).
    """
    on_node = os.environ.get("SLURM_GPUS_ON_NODE", "").strip()
    if on_node.isdigit():
        return int(on_node)
    return configured or None


def scontrol_requeue(job_id: str) -> bool:
    res = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if res.returncode != 0:  # e.g. Slurm is already requeueing it after a preemption
        log.warning("scontrol requeue %s: %s", job_id, res.stderr.strip())
    return res.returncode == 0


def _wait_for_nodes(address: str, n: int, timeout_s: float) -> list[dict[str, Any]]:
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with handlers_kept():  # ray.init's SIGTERM handler would exit at once, nothing saved
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


class SlurmNode:
    """This node's part of one life of the job, below the run (see the module docstring).

    Construct it once per process; use it as a context manager (its exit is :meth:`close`).
    """

    def __init__(self, slurm: SlurmConfig, output: Path, jobs: JobLayout, node_type: str = "both") -> None:
        self.slurm, self.output, self.jobs = slurm, output, jobs
        self.env = node = NodeEnv.detect(slurm.rendezvous)
        # Ray's token for this life: a 0600 file in the job's directory, written by rank 0 before its
        # head starts; every node's Ray and this process (rank 0's driver) read it (cluster/auth.py).
        self.token_file = jobs.ray_token(node.key)
        RayAuth(token_path=self.token_file)
        self.rdv = Rendezvous(jobs.rendezvous(node.key), node.rank, node.size, slurm.rendezvous)
        kinds = ({"gpu", "cpu"} if node_type == "both" else {node_type}) | ({"head"} if node.rank == 0 else set())
        cleanup_temp_dirs(node.job_id, node.restart, keep_current=True)
        # Rank 0's lifeline port is taken first, so the Ray worker ports picked next avoid it.
        self.lifeline = Lifeline(node.node_ip) if node.rank == 0 and node.size > 1 else None
        self.ray_node = RayNode(
            node.node_ip, pick_ports(node.node_ip, avoid={self.lifeline.port} if self.lifeline else set()), node_resources(kinds),
            f"/tmp/mhpc-{node.key}", jobs.ray_log(node.key, node.rank),
        )  # fmt: skip
        self.num_gpus = node_gpus(slurm.gpus_per_node) if "gpu" in kinds else None
        self._probe: Path | None = None

    def say(self, msg: str) -> None:
        print(f"[rank {self.env.rank} {self.env.hostname}] {msg}", file=sys.stderr, flush=True)

    def __enter__(self) -> SlurmNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_shared_path(self) -> None:
        """Every node sees ``output.path`` (else :class:`~.nodecheck.SharedPathError` naming the node)."""
        node = self.env
        self._probe = probe_shared_path(self.output, node.key, node.rank, node.size, node.hostname, self.slurm.fs_probe_timeout_s)
        local_locks = node_local_locks(self.output)
        if local_locks and node.rank == 0:
            self.say(f"warning: output.path {self.output}: {local_locks}, so file locks hold on one node only: "
                     "nothing stops a second run on another node from writing the same store")  # fmt: skip

    def form_cluster(self) -> str:
        """Rank 0: start the Ray head, publish it, wait for every node; returns the head's address."""
        node, slurm, ray_node = self.env, self.slurm, self.ray_node
        t0 = time.time()
        new_ray_token(self.token_file, self.jobs.ray_tokens(node.job_id))
        ray_node.start(num_gpus=self.num_gpus)
        ray_node.wait_head_ready()
        published = {
            "address": ray_node.address,
            "host": node.hostname,
            **({"lifeline": self.lifeline.address, "lifeline_token": self.lifeline.token} if self.lifeline else {}),
        }
        head = self.rdv.exchange(published, slurm.join_timeout_s)
        nodes = _wait_for_nodes(ray_node.address, node.size, slurm.join_timeout_s)
        atomic_write_json(
            self.jobs.cluster_file(node.key),
            {"address": ray_node.address, "via": head["via"], "nodes": nodes, "formed_in_s": time.time() - t0},
            durable=False,
        )
        self.say(f"Ray cluster of {len(nodes)} node(s) at {ray_node.address} formed in {time.time() - t0:.1f}s (rendezvous by {head['via']})")
        return ray_node.address

    def requeue_or_fail(self) -> int:
        """This life cannot go on (rank 0's driver or node is gone): requeue the job so the next life
        resumes from the store, or, with ``max_requeues`` used up, let it fail."""
        node, max_requeues = self.env, self.slurm.max_requeues
        if "SLURM_JOB_ID" not in os.environ:
            return 1
        if node.restart >= max_requeues:
            self.say(f"not requeued: restart {node.restart} reached cluster.slurm.max_requeues ({max_requeues}); the job ends failed")
        elif scontrol_requeue(node.job_id):
            self.say(f"requeued job {node.job_id}; it resumes from {self.output}")
        return 1

    def serve(self, signals: StopSignals, stop_grace_s: float) -> int:
        """A rank other than 0: join the head, then serve until rank 0 says the run is over (its
        lifeline, else the ``done`` file). The driver dead (its lifeline closed with no ``done``):
        requeue at once. The head node unreachable for ``head_lost_s``: requeue."""
        node, slurm, ray_node, say = self.env, self.slurm, self.ray_node, self.say
        head = self.rdv.exchange(None, slurm.join_timeout_s)
        wait_secret(self.token_file, slurm.fs_probe_timeout_s)  # Ray aborts on a token file it cannot read
        link: DriverLink | None = None
        if head.get("lifeline"):
            try:
                link = DriverLink(head["lifeline"], head.get("lifeline_token", ""), node.rank)
            except ConnectionRefusedError:  # rank 0 ended (or died) before this node joined: nothing to serve
                say(f"rank 0 on {head.get('host', '?')} has ended before this node joined (see its log)")
                return 1
            except OSError as exc:  # its node does not answer: the head watch below decides
                say(f"warning: rank 0's lifeline {head['lifeline']} unreachable ({exc}); watching the Ray head only")
        ray_node.start(head["address"], num_gpus=self.num_gpus)
        say(f"joined the Ray head at {head['address']} (rendezvous by {head['via']})")
        give_up: float | None = None
        head_watch = _HeadWatch(head["address"], slurm.head_lost_s)
        joins = 1
        state = "running"
        try:
            while not self.rdv.finished() and not head_watch.lost():
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
                    ray_node.start(head["address"], num_gpus=self.num_gpus)
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
        if state == "done" or give_up is not None or self.rdv.finished() or (state == "dead" and stopping):
            return 0
        if state == "dead":
            # SIGKILL, the OOM killer, a segfault: the Ray head may live on (it escapes the job's process
            # tracking on some sites) and nothing else would ever end this life.
            say(f"the driver on rank 0 ({head.get('host', '?')}) died before the run ended: its lifeline closed with no 'done'")
            return self.requeue_or_fail()
        if head_watch.lost(wait=True):
            # The head node died. Under --no-kill Slurm keeps the job running without it
            # (and without its batch script): requeue it here so the next life resumes.
            say(f"the head node {head.get('host', '?')} ({head['address']}) is unreachable for {slurm.head_lost_s:.0f}s: the run cannot go on")
            return 1 if stopping else self.requeue_or_fail()
        return 0

    def close(self) -> None:
        """The end of this node's life: rank 0 tells every rank first, then each node stops its Ray."""
        node = self.env
        if node.rank == 0:
            self.rdv.finish()  # for a rank still waiting for the head's address
            if self.lifeline is not None:  # every rank is told before the head goes away
                try:
                    self.lifeline.end()
                except Exception:  # never keep the head from stopping
                    log.exception("lifeline: telling the ranks the run is over failed")
            if self._probe is not None:
                shutil.rmtree(self._probe, ignore_errors=True)
        self.ray_node.stop()
        cleanup_temp_dirs(node.job_id, node.restart, keep_current=False)
        if node.rank == 0:
            remove_secret(self.token_file)
