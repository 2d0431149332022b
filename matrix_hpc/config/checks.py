"""Checks across sections, run when the config loads: models, the roles that call them, GPUs.

Each mistake is one :class:`ConfigError` line naming the key; a model no role
uses is only a warning (it is started anyway: ``matrix-hpc serve`` may want it).
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

from .build import ConfigError

if TYPE_CHECKING:
    from .job import JobConfig

__all__ = ["check_job", "model_key"]

log = logging.getLogger(__name__)

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def model_key(config: JobConfig, name: str) -> str:
    """The dotted key a user wrote for model ``name``: ``llm`` for the shorthand, else ``models.NAME``."""
    return "llm" if config.llm is not None and config.models.get(name) is config.llm else f"models.{name}"


def check_job(config: JobConfig) -> None:
    for name in config.models:
        _check_model(config, name)
    _check_roles(config)
    _check_gpus(config)


def _check_model(config: JobConfig, name: str) -> None:
    m, key = config.models[name], model_key(config, name)
    if m.engine == "external" and not m.base_urls:
        raise ConfigError(f"{key}.base_urls: required when {key}.engine is 'external'")
    if m.engine != "external" and m.base_urls:
        # A managed engine serves its own endpoints; extra URLs would be routed to unprobed.
        raise ConfigError(
            f"{key}.base_urls: only used with {key}.engine: external (this model's engine is {m.engine!r}); remove it or set {key}.engine=external"
        )
    if m.engine == "vllm" and not m.vllm.model:
        raise ConfigError(f"{key}.vllm.model: required when {key}.engine is 'vllm'")
    if m.api_key_env is not None and not _ENV_NAME.match(m.api_key_env):
        # A key pasted here would be saved with the config (run.json): refuse, and do not echo it.
        raise ConfigError(f"{key}.api_key_env: expected the name of an environment variable, not a key")
    for attr in ("replicas", "max_connections", "max_outstanding_per_endpoint", "health_failures", "max_tokens"):
        if getattr(m, attr) is not None and getattr(m, attr) < 1:
            raise ConfigError(f"{key}.{attr}: must be >= 1, got {getattr(m, attr)}")
    for attr in ("tensor_parallel_size", "pipeline_parallel_size"):
        if getattr(m.vllm, attr) < 1:
            raise ConfigError(f"{key}.vllm.{attr}: must be >= 1, got {getattr(m.vllm, attr)}")
    if m.health_timeout_s is not None and m.health_timeout_s <= 0:
        raise ConfigError(f"{key}.health_timeout_s: must be > 0, got {m.health_timeout_s}")
    if m.gpus_per_replica is not None and m.gpus_per_replica < 0:
        raise ConfigError(f"{key}.gpus_per_replica: must be >= 0, got {m.gpus_per_replica}")


def _check_roles(config: JobConfig) -> None:
    wf = config.workflow
    if "sandbox" in wf.params:
        raise ConfigError("workflow.params.sandbox: the sandbox settings moved to the top-level sandbox section")
    used: set[str] = set()
    for role, rc in wf.roles.items():
        key = f"workflow.roles.{role}"
        if "sandbox" in rc.params:
            raise ConfigError(f"{key}.params.sandbox: the sandbox settings moved to the top-level sandbox section")
        if rc.model is not None and rc.model not in config.models:
            raise ConfigError(f"{key}.model: unknown model {rc.model!r} (models: {', '.join(config.models)})")
        problem = rc.sampling.check(f"{key}.sampling")
        if problem:
            raise ConfigError(problem)
        model = config.role_model(role)
        if model is not None:
            used.add(model)
    for name in config.models:
        if name not in used:
            log.warning("%s: no role uses this model (name it in workflow.roles.NAME.model)", model_key(config, name))


def _check_gpus(config: JobConfig) -> None:
    """More GPUs asked for than a Slurm allocation has, when the config says what it has."""
    s = config.cluster.slurm
    if config.cluster.kind != "slurm" or s.gpus_per_node <= 0:
        return
    have = (s.gpu_nodes or s.nodes) * s.gpus_per_node
    asked = {name: m.allocation_gpus for name, m in config.models.items()}
    for name, m in config.models.items():
        per = asked[name] // max(m.replicas, 1)
        if m.engine == "vllm" and m.vllm.pipeline_parallel_size == 1 and per > s.gpus_per_node:
            raise ConfigError(
                f"{model_key(config, name)}.vllm.tensor_parallel_size: a replica needs {per} GPUs on one node, cluster.slurm.gpus_per_node is {s.gpus_per_node}"
            )
    total = sum(asked.values())
    if total > have:
        detail = ", ".join(f"{n} {g}" for n, g in asked.items() if g)
        raise ConfigError(
            f"models: {total} GPUs asked ({detail}; replicas x tensor x pipeline), the allocation has {have} (cluster.slurm gpu nodes x gpus_per_node)"
        )
