"""Every path of a run, in one place: what each holds and who writes it.

No other module builds a path under a run's output or job folder: it asks this one
(as submitit's ``JobPaths`` does for a job's files). Each file has one writer::

    OUTPUT/                           output.path (on a cluster: a shared filesystem)
      store.json                      format and chunk size; init_store, once, at creation
      part-000/                       one store part (StoreWriter, through the sink actor)
        data.zarr/                    one 1-D array per column, whole-chunk writes
        commit.json                   rows [0, N) are committed: all a reader trusts
        writer.lock                   flock held by the part's only writer
        writer.lease                  who holds it (host, pid, run), renewed while it lives
      run.json                        the run's lives, totals, endpoints, hosts; the driver (job.py)
      services.json                   the endpoints of ``matrix-hpc serve``; serve.py
      journal/                        completed LLM calls per actor incarnation (turn-level
                                      replay); the agent actors, compacted by the driver
      logs/                           the driver's folder for its helpers' logs:
        agents.log                    full tracebacks of agent exceptions; the agent actors
        <engine>-<port>.log           one LLM engine's output; that engine (services/llm)
      .secrets/                       0700: llm-RUN.key, the managed LLM servers' API key; job.py / serve.py
      .nodes/JOB.RESTART/             a Slurm life's shared-filesystem probe; every rank, removed by rank 0
      prometheus_targets.json         where Prometheus finds the run's metrics; the driver
      slurm/                          the default Slurm job folder (see :class:`JobLayout`)

    JOB_DIR/                          cluster.slurm.job_dir, else OUTPUT/slurm
      jobs.json                       every Slurm job of the run; submit and rank 0 of each job
      submitit/<job id>/              submitit's files of a job it submitted
      rendezvous/JOB.RESTART/         one life's rendezvous files; cluster/slurm/rendezvous.py
      logs/ray-JOB.RESTART-rankR.log  the ``ray start`` output of one node of one life; that node
      cluster-JOB.RESTART.json        the Ray cluster a life formed (address, nodes); rank 0
      .secrets/ray-JOB.RESTART.token  0700 folder: one life's Ray auth token; rank 0, removed at its end

The files inside a protocol's own folder are named by that protocol's module: the journal's
files (store/call_journal.py), the rendezvous files (cluster/slurm/rendezvous.py), the probe's
rank files (cluster/slurm/nodecheck.py), zarr's arrays. Paths are joined, never resolved:
a layout of a relative root stays relative. Standard library only: every layer may use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["JobLayout", "PartLayout", "RunLayout", "engine_log"]

_PART_PREFIX = "part-"


def _path(value: str | os.PathLike[str]) -> Path:
    return value if isinstance(value, Path) else Path(value)


def engine_log(logs: str | os.PathLike[str], engine: str, port: int) -> Path:
    """``LOGS/<engine>-<port>.log``: one LLM engine's output (an engine also runs outside a
    run, with any folder for ``logs``)."""
    return _path(logs) / f"{engine}-{port}.log"


@dataclass(frozen=True)
class PartLayout:
    """The files of one store part (``OUTPUT/part-NNN``); the part's writer writes them all."""

    dir: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "dir", _path(self.dir))

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def data(self) -> Path:
        """``data.zarr``: the zarr group, one array per column."""
        return self.dir / "data.zarr"

    @property
    def has_data(self) -> bool:
        """The part's arrays were created (zarr's group file is there)."""
        return (self.data / "zarr.json").exists()

    @property
    def commit(self) -> Path:
        """``commit.json``: ``{"rows": N}``, rows [0, N) committed."""
        return self.dir / "commit.json"

    @property
    def lock(self) -> Path:
        """``writer.lock``: the flock held by the part's only writer."""
        return self.dir / "writer.lock"

    @property
    def lease(self) -> Path:
        """``writer.lease``: who holds the lock, renewed while the writer lives."""
        return self.dir / "writer.lease"


@dataclass(frozen=True)
class JobLayout:
    """The files of a run's Slurm jobs (``cluster.slurm.job_dir``, by default ``OUTPUT/slurm``)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", _path(self.root))

    @property
    def jobs_json(self) -> Path:
        """``jobs.json``: every Slurm job of the run (``submit``, and rank 0 of a job started by sbatch)."""
        return self.root / "jobs.json"

    @property
    def submitit(self) -> Path:
        """submitit's folder pattern (``%j``: the job id it fills in)."""
        return self.root / "submitit" / "%j"

    def rendezvous(self, key: str) -> Path:
        """The rendezvous folder of life ``key`` (``JOB.RESTART``)."""
        return self.root / "rendezvous" / key

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def ray_log(self, key: str, rank: int) -> Path:
        """The ``ray start`` output of node ``rank`` in life ``key``."""
        return self.logs / f"ray-{key}-rank{rank}.log"

    def cluster_file(self, key: str) -> Path:
        """``cluster-JOB.RESTART.json``: the Ray cluster life ``key`` formed (rank 0 writes it)."""
        return self.root / f"cluster-{key}.json"

    @property
    def secrets(self) -> Path:
        """``.secrets``: 0700, the Ray tokens of the job's lives."""
        return self.root / ".secrets"

    def ray_token(self, key: str) -> Path:
        """The Ray auth token of life ``key`` (``JOB.RESTART``)."""
        return self.secrets / f"ray-{key}.token"

    def ray_tokens(self, job_id: str) -> list[Path]:
        """The token files of every life of Slurm job ``job_id`` still on disk."""
        return sorted(self.secrets.glob(f"ray-{job_id}.*.token"))


@dataclass(frozen=True)
class RunLayout:
    """The paths of the run whose output folder is ``root`` (see the module docstring)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", _path(self.root))

    # -- the store ------------------------------------------------------------

    @property
    def store_json(self) -> Path:
        """``store.json``: the store's format and chunk size, written once at creation."""
        return self.root / "store.json"

    def part(self, index: int) -> PartLayout:
        """Store part ``index`` (``part-000`` is the sink's)."""
        return PartLayout(self.root / f"{_PART_PREFIX}{index:03d}")

    def parts(self) -> list[PartLayout]:
        """The store's part folders on disk, in name order (with arrays or not: see :attr:`PartLayout.has_data`)."""
        return [PartLayout(p) for p in sorted(self.root.glob(f"{_PART_PREFIX}*")) if p.is_dir()]

    # -- the driver's files -----------------------------------------------------

    @property
    def run_json(self) -> Path:
        """``run.json``: the run's lives, totals, LLM endpoints, actor hosts (the driver writes it)."""
        return self.root / "run.json"

    @property
    def services_json(self) -> Path:
        """``services.json``: the endpoints of ``matrix-hpc serve`` (serve.py writes it)."""
        return self.root / "services.json"

    @property
    def prometheus_targets(self) -> Path:
        """``prometheus_targets.json``: for Prometheus' ``file_sd_configs``."""
        return self.root / "prometheus_targets.json"

    @property
    def journal(self) -> Path:
        """``journal/``: completed LLM calls, one file per actor incarnation (turn-level replay)."""
        return self.root / "journal"

    @property
    def logs(self) -> Path:
        """``logs/``: agents.log and the managed LLM engines' logs."""
        return self.root / "logs"

    @property
    def agents_log(self) -> Path:
        """``logs/agents.log``: full tracebacks of agent exceptions (the agent actors append)."""
        return self.logs / "agents.log"

    @property
    def secrets(self) -> Path:
        """``.secrets``: 0700, the managed LLM servers' API keys."""
        return self.root / ".secrets"

    def llm_key(self, run_id: str) -> Path:
        """The API key of run ``run_id``'s managed LLM servers."""
        return self.secrets / f"llm-{run_id}.key"

    def node_probe(self, key: str) -> Path:
        """``.nodes/JOB.RESTART``: where each rank of a Slurm life checks it shares this folder."""
        return self.root / ".nodes" / key

    # -- Slurm ------------------------------------------------------------------

    @property
    def slurm(self) -> Path:
        """The default Slurm job folder (when ``cluster.slurm.job_dir`` is unset)."""
        return self.root / "slurm"

    def job(self, job_dir: str | os.PathLike[str] | None = None) -> JobLayout:
        """The job folder's layout: ``job_dir`` if given, else :attr:`slurm`."""
        return JobLayout(_path(job_dir) if job_dir else self.slurm)
