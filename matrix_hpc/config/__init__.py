"""The typed job spec: a YAML file plus ``key=value`` overrides.

Every section is a dataclass built by the one builder (:mod:`.build`); a mistake is
a :class:`ConfigError` naming the dotted key. Sections: :mod:`.job` (workflow, dataset,
cluster, output, run), :mod:`.llm` (models and sampling), :mod:`.sandbox`;
:mod:`.checks` holds the checks across sections, :mod:`.load` the loading pipeline.
"""

from .build import ConfigError, parse_overrides
from .job import (
    ClusterConfig,
    DatasetConfig,
    JobConfig,
    OutputConfig,
    RoleConfig,
    RunConfig,
    SlurmConfig,
    WorkflowConfig,
)
from .llm import EmbeddedEngineConfig, LLMConfig, ModelConfig, Sampling, SamplingConfig, VLLMConfig, resolve_sampling
from .load import load_config, resolve_dataset_path
from .sandbox import PoolConfig

__all__ = [
    "ClusterConfig",
    "ConfigError",
    "DatasetConfig",
    "EmbeddedEngineConfig",
    "JobConfig",
    "LLMConfig",
    "ModelConfig",
    "OutputConfig",
    "PoolConfig",
    "RoleConfig",
    "RunConfig",
    "Sampling",
    "SamplingConfig",
    "SlurmConfig",
    "VLLMConfig",
    "WorkflowConfig",
    "load_config",
    "parse_overrides",
    "resolve_dataset_path",
    "resolve_sampling",
]
