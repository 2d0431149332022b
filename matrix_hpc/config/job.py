"""The typed job spec: a YAML file plus ``key=value`` overrides.

Every section is a dataclass; :func:`.load.load_config` builds them from plain data and
rejects unknown keys and wrong types with a :class:`ConfigError` that names the
dotted key (``run.max_in_flight: expected int, got 'many'``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from .llm import ModelConfig, SamplingConfig
from .sandbox import PoolConfig

__all__ = [
    "ClusterConfig",
    "DatasetConfig",
    "JobConfig",
    "OutputConfig",
    "RoleConfig",
    "RunConfig",
    "SlurmConfig",
    "WorkflowConfig",
]

log = logging.getLogger(__name__)


@dataclass
class SlurmConfig:
    """The allocation ``matrix-hpc submit`` asks for (the sbatch script carries its own header)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = 60
    """Time limit in minutes; the job is requeued and resumes when it runs out."""
    nodes: int = 1
    """CPU nodes (agents); with ``gpu_nodes`` too, the job is heterogeneous."""
    gpu_nodes: int = 0
    """GPU nodes (LLM and sandbox services)."""
    gpus_per_node: int = 0
    cpus_per_node: int | None = None
    mem_gb: int | None = None
    """Memory per node."""
    signal_lead_s: int = 120
    """USR2 this long before the time limit (``--signal=USR2@N``): stop intake, flush, requeue."""
    max_requeues: int = 20
    """Give up (no further requeue) after this many restarts of one job."""
    job_dir: str | None = None
    """Logs, submitit files and rendezvous; default: ``<output.path>/slurm``."""
    extra_sbatch: dict[str, Any] = field(default_factory=dict)
    """More sbatch options, e.g. ``{constraint: a100, exclusive: true}``."""
    rendezvous: Literal["auto", "mpi", "file"] = "auto"
    """How nodes learn the head's address: MPI broadcast when started under MPI, else a file."""
    join_timeout_s: float = 300.0
    """How long the head waits for every node to join."""
    head_lost_s: float = 30.0
    """A node that cannot reach the Ray head for this long before the run is over requeues the
    job: the head node died (``--no-kill`` keeps the job alive without it)."""
    fs_probe_timeout_s: float = 30.0
    """How long nodes wait for each other's probe files in ``output.path`` before the run
    stops naming the node that cannot see it (a node-local path)."""


@dataclass
class ClusterConfig:
    kind: Literal["local", "slurm"] = "local"
    """``local``: a private Ray on this machine; ``slurm``: a Ray cluster over a Slurm allocation."""
    address: str | None = None
    """Connect to this running Ray cluster instead of starting one."""
    num_cpus: int | None = None
    """CPUs the local Ray node advertises (default: all)."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class RoleConfig:
    agent: str
    """``module:Class`` of the role's :class:`~matrix_hpc.agents.Agent` subclass."""
    instances: int = 1
    """Ray actors serving this role."""
    concurrency: int | None = None
    """Tasks one actor runs at once; default: ``run.max_in_flight`` ÷ ``instances`` (rounded up)."""
    params: dict[str, Any] = field(default_factory=dict)
    """Free-form settings handed to the agent's constructor."""
    inline: bool = False
    """Run this role's steps inside the actor that hands it a task (no Ray hop):
    for cheap roles that call no LLM, such as answer extraction. Such a role gets no actor of
    its own unless it is the entry (``instances`` is then unused)."""
    model: str | None = None
    """The key in ``models`` this role calls; optional when there is one model, none for a role
    that calls no LLM."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """What every LLM call of this role sends (``max_tokens``, ``temperature``, ``top_p``, ``stop``,
    ``seed``, ``response_format``, ``extra``); unset keys take the model's defaults."""


@dataclass
class WorkflowConfig:
    name: str
    entry: str
    """The role every task starts at."""
    roles: dict[str, RoleConfig]
    metrics: str | None = None
    """``module:function`` turning a list of records into summary metrics."""
    params: dict[str, Any] = field(default_factory=dict)
    """Settings shared by every role (merged under each role's params)."""
    python_path: list[str] = field(default_factory=lambda: ["."])
    """Folders on the import path of the driver and of every Ray worker (relative to the
    config file's folder; the default is that folder), so agents load with no PYTHONPATH."""


@dataclass
class DatasetConfig:
    path: str
    """A JSONL or Parquet file; a folder or glob of them (``data/*.parquet``); a folder
    ``datasets.save_to_disk`` wrote; or a Hugging Face dataset name (``org/name``) found in
    the local Hugging Face cache, offline (relative paths: see :func:`load_config`).
    The last two need ``pip install 'matrix-hpc[hf]'``."""
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    id_field: str | None = "id"
    """Field holding a row's stable id; rows without it get a content hash (a warning
    says how many; none having it is an error). ``null``: hash every row on purpose."""
    required_fields: list[str] = field(default_factory=list)
    max_row_bytes: int = 65536
    """Rows larger than this (serialized) fail with a recorded reason."""
    limit: int | None = None
    """Only the first N rows (after which the run is complete)."""
    split: str | None = None
    """The split to read (``train``): of a saved ``DatasetDict`` or a cached Hugging Face
    dataset, or the files of a folder/glob under ``train/`` or named ``train-*``/``train.*``."""
    columns: list[str] | dict[str, str] | None = None
    """Only these columns; a mapping also renames them (``{problem: question}``). The
    ``id_field`` column is kept either way."""


@dataclass
class OutputConfig:
    path: str | None = None
    """The output folder; default ``outputs/<workflow.name>`` in the current folder
    (relative paths: see :func:`load_config`)."""
    chunk_rows: int = 256
    """Records per zarr chunk (the unit of a write)."""
    flush_interval_s: float = 1.0
    """Longest a finished record waits before it is committed."""
    fsync: bool = True
    """fsync chunks and the commit file (survives power loss, not just a killed process)."""
    commit_retry_s: float = 300.0
    """How long the sink retries a failing commit (disk full, EIO, quota), keeping the rows,
    before the run stops with one line saying so (a re-run after freeing space resumes)."""


@dataclass
class RunConfig:
    max_in_flight: int = 256
    """Tasks started and not yet handed to the sink, across the whole run (backpressure);
    while commits fail, no new task starts."""
    max_attempts: int = 3
    """Times a task lost with a dead actor is re-sent before it fails."""
    batch_size: int = 64
    """Messages per Ray call between actors."""
    batch_wait_ms: float = 100.0
    """Longest a message waits in an outbox for its batch to fill. The window adapts below it:
    about 5% of an actor's tasks wait there at a time (few tasks: sent at once)."""
    progress: Literal["auto", "bar", "log", "off"] = "auto"
    progress_interval_s: float = 5.0
    """Seconds between progress lines when not on a terminal."""
    health_interval_s: float = 1.0
    """Seconds between liveness checks of the actors."""
    metrics: bool = True
    """Export Prometheus metrics through Ray (matrix_hpc.metrics; README "Watching a run")."""
    agent_placement: Literal["spread", "pack"] = "spread"
    """``spread``: a role's instances go to different (CPU) nodes where possible, so a dead
    node takes few of them (Ray re-creates them on the nodes left, ``max_actor_restarts``
    times; the sink and the LLM registries stay on the driver's node); ``pack``: Ray fills
    one node first."""
    loop_lag_warn_s: float = 0.5
    """Warn (naming the role) when an agent actor's event loop stalls this long: a step
    is blocking it (``time.sleep``, synchronous I/O). 0 turns the watch off."""
    stop_grace_s: float = 10.0
    """On a stop by Ctrl-C or USR2 (a TERM gives none, on Slurm or not: the KILL is near; see
    matrix_hpc/stopsignals.py): how long tasks in flight may finish before the rest are abandoned (they are not in
    the store, so the resumed run does them again)."""
    stall_timeout_s: float = 600.0
    """When no task moves (no step, no commit) for this long, the driver logs who holds the
    tasks in flight and re-sends those nobody holds; after as long again it stops the run
    with one line. 0 turns it off. Keep it above the longest single LLM call with retries."""
    stop_after_failures: int = 20
    """When the first this many tasks of a run to finish all failed with the same kind (a
    misspelt ``next_role``, a bug in a step), stop the run with one line naming the kind and a
    sample, rather than pay for every task's LLM calls; tasks not started are left for a
    re-run. 0 turns it off."""
    max_actor_restarts: int = 10
    """Times Ray restarts a crashed agent or sink actor. An agent past it is gone for good:
    its role's other instances take its tasks; a role with none left stops the run."""
    replay: bool = True
    """Journal every completed LLM call (``OUTPUT/journal``) so a resumed task replays the
    calls it already paid for instead of making them again (turn-level resume)."""
    replay_compact_s: float = 30.0
    """Seconds between compactions of the journal (entries of committed tasks dropped)."""
    retry_failed: str | list[str] | None = None
    """Run again the ids whose current record is failed: ``all``, or only these failure
    kinds (``agent_error,schema`` or a list). Each new record replaces the failed one for
    every reader; the failed one stays in the store (``matrix-hpc show OUT ID --history``).
    ``matrix-hpc run CONFIG --retry-failed [KIND,...]`` sets it. null: failed records are
    kept as they are, like every finished one."""


@dataclass
class JobConfig:
    workflow: WorkflowConfig
    dataset: DatasetConfig
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    models: dict[str, ModelConfig] = field(default_factory=dict)
    """Named models; a role calls the one it names (``workflow.roles.NAME.model``)."""
    llm: ModelConfig | None = None
    """Shorthand for one model, named ``llm.model`` (default ``default``); not together with ``models``.
    After loading it is the same object as that entry of ``models``."""
    sandbox: PoolConfig | None = None
    """Settings of the per-node sandbox pool, for workflows that run tools (agents get it as ``ctx.sandbox``)."""
    output: OutputConfig = field(default_factory=OutputConfig)
    run: RunConfig = field(default_factory=RunConfig)
    source_file: str | None = field(default=None, metadata={"internal": True})

    def to_dict(self) -> dict[str, Any]:
        """Plain data that loads back to this config (``llm`` folded into ``models``)."""
        data = dataclasses.asdict(self)
        data.pop("source_file", None)
        data.pop("llm", None)
        return data

    def role_model(self, role: str) -> str | None:
        """The key in ``models`` of the model ``role`` calls (the only one, when it names none)."""
        named = self.workflow.roles[role].model
        if named is None and len(self.models) == 1:
            return next(iter(self.models))
        return named
