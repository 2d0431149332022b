"""Loading a job spec: YAML file + ``key=value`` overrides -> a checked :class:`JobConfig`.

The sections (:mod:`.job`) know nothing of loading; this module runs the one pipeline:
parse, merge, build (every mistake names its dotted key), resolve paths, fold models,
the per-section checks, then the cross-section ones (:mod:`.checks`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from .build import ConfigError, build, merge, parse_overrides
from .checks import check_job
from .job import JobConfig
from .llm import ModelConfig

__all__ = ["PATH_KEYS", "load_config", "resolve_dataset_path"]


def load_config(path: str | os.PathLike[str], overrides: list[str] | None = None) -> JobConfig:
    """Read a YAML job spec, apply ``key=value`` overrides, and type-check it.

    Path keys (:data:`PATH_KEYS`) come back absolute: a relative path written in the
    file is taken from the file's folder, one given as ``key=value`` from the current folder.
    """
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
    file_data, override_data = data, parse_overrides(overrides or [])
    data = merge(file_data, override_data)
    config = build(JobConfig, data, "")
    config.source_file = str(path.resolve())
    _resolve_paths(config, file_data, override_data, path.resolve().parent)
    _fold_models(config)
    _validate(config)
    check_job(config)
    return config


def _fold_models(config: JobConfig) -> None:
    """One map of models whatever was written: ``llm:`` (or nothing) is one model named ``llm.model``."""
    if config.llm is not None and config.models:
        raise ConfigError("llm: give either llm (one model) or models (several), not both")
    if not config.models:
        llm = config.llm or ModelConfig()
        llm.model = llm.model or "default"
        config.llm = llm
        config.models = {llm.model: llm}
    for name, model in config.models.items():
        model.model = model.model or name


PATH_KEYS = ("dataset.path", "output.path", "cluster.slurm.job_dir")
"""Config keys holding a file or folder; :func:`load_config` makes them absolute."""


def _given(data: dict[str, Any], key: str) -> bool:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return node is not None


def _hub_name(value: str) -> bool:
    return (
        bool(re.match(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$", value))
        and not value.startswith(".")
        and Path(value).suffix.lower() not in (".jsonl", ".json", ".ndjson", ".parquet", ".pq")
    )


def _resolve_paths(config: JobConfig, file_data: dict[str, Any], override_data: dict[str, Any], config_dir: Path) -> None:
    """One rule for every path key: a relative path is taken from the folder of the place
    it was written: the config file's folder for a value in the file, the current
    folder for a ``key=value`` on the command line (and for the default output path)."""
    if config.output.path is None:
        config.output.path = f"outputs/{config.workflow.name}"
    for key in PATH_KEYS:
        *parents, attr = key.split(".")
        obj: Any = config
        for part in parents:
            obj = getattr(obj, part)
        value = getattr(obj, attr)
        if value is None:
            continue
        p = Path(os.path.expanduser(value))
        if not p.is_absolute():
            in_file = _given(file_data, key) and not _given(override_data, key)
            if key == "dataset.path" and _hub_name(value) and not ((config_dir if in_file else Path.cwd()) / p).exists():
                continue  # a Hugging Face dataset name (org/name), looked up in the local cache
            p = (config_dir if in_file else Path.cwd()) / p
        setattr(obj, attr, os.path.normpath(p))


def resolve_dataset_path(config: JobConfig) -> Path:
    """The dataset path (absolute once :func:`load_config` has resolved it)."""
    return Path(os.path.expanduser(config.dataset.path))


def _validate(config: JobConfig) -> None:
    wf = config.workflow
    if wf.entry not in wf.roles:
        raise ConfigError(f"workflow.entry: {wf.entry!r} is not one of workflow.roles ({', '.join(wf.roles)})")
    for name, role in wf.roles.items():
        if ":" not in role.agent:
            raise ConfigError(f"workflow.roles.{name}.agent: expected 'module:Class', got {role.agent!r}")
        for attr in ("instances", "concurrency"):
            if getattr(role, attr) is not None and getattr(role, attr) < 1:
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
    if config.run.stop_after_failures < 0:
        raise ConfigError(f"run.stop_after_failures: must be >= 0 (0 turns it off), got {config.run.stop_after_failures}")
    if config.run.replay_compact_s <= 0:
        raise ConfigError(f"run.replay_compact_s: must be > 0, got {config.run.replay_compact_s}")
