"""Finding a workflow's code: its import path, and a check of every ``module:attr`` it names.

A workflow may live outside the repo (``my_wf/config.yaml`` next to ``my_wf/agents.py``).
``workflow.python_path`` (default ``["."]``: the config file's folder) is put on the import
path of the driver here and of every Ray worker on every node (``start_ray`` sets it in
the job's ``runtime_env``), so no ``PYTHONPATH`` is needed. :func:`check_workflow_code`
imports the agent classes and the metrics function before Ray or an engine starts, so a
typo fails in a second with the key that names it.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..config import ConfigError, JobConfig
from .agent import Agent

__all__ = ["add_import_paths", "check_workflow_code", "import_paths", "load_object"]


def load_object(path: str) -> Any:
    """Import ``module:attr``."""
    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"cannot load {path!r}: {exc}") from exc


def import_paths(config: JobConfig) -> list[str]:
    """``workflow.python_path`` as absolute folders (relative entries from the config file's folder)."""
    base = Path(config.source_file).parent if config.source_file else Path.cwd()
    out: list[str] = []
    for entry in config.workflow.python_path:
        p = Path(os.path.expanduser(entry))
        p = (p if p.is_absolute() else base / p).resolve()
        if str(p) not in out:
            out.append(str(p))
    return out


def add_import_paths(paths: list[str]) -> None:
    """Put ``paths`` on this process's import path where the workers get them: after the
    ``PYTHONPATH`` entries, before the installed packages (see ``start_ray``)."""
    env_entries = {str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    pos = 1  # sys.path[0] is the script's folder
    while pos < len(sys.path) and str(Path(sys.path[pos] or ".").resolve()) in env_entries:
        pos += 1
    for p in reversed(paths):
        if p not in sys.path:
            sys.path.insert(pos, p)
    importlib.invalidate_caches()


def _describe(path: str, exc: BaseException, paths: list[str]) -> str:
    """One line: why ``path`` did not load, with a close match or the folders searched."""
    module, _, attr = path.partition(":")
    cause = exc.__cause__ or exc
    if isinstance(cause, ModuleNotFoundError) and cause.name and module.startswith(cause.name):
        where = ", ".join(paths) or "none"
        return f"cannot import module {module!r} ({cause}); workflow.python_path folders: {where}"
    if isinstance(cause, AttributeError) and module in sys.modules:
        names = [n for n, v in vars(sys.modules[module]).items() if inspect.isclass(v) or inspect.isfunction(v)]
        close = difflib.get_close_matches(attr, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"module {module!r} has no attribute {attr!r}{hint}"
    return f"cannot load {path!r}: {type(cause).__name__}: {cause}"


def _load(path: str, key: str, paths: list[str]) -> Any:
    try:
        return load_object(path)
    except Exception as exc:  # the user's module may raise anything at import (SyntaxError, NameError)
        raise ConfigError(f"{key}: {_describe(path, exc, paths)}") from None


def role_problem(role: str, cls: object, agent: str, has_model: bool, inline: bool, models: Iterable[str]) -> str | None:
    """What is wrong with role ``role``'s loaded agent class ``cls`` (``agent``: its path), as a
    message naming the key; None when nothing is. Checked before Ray starts (from the config)
    and again by :class:`~matrix_hpc.runtime.team.Team` (from a team spec built by hand)."""
    if not (isinstance(cls, type) and issubclass(cls, Agent)):
        return f"workflow.roles.{role}.agent: {agent} is not a subclass of matrix_hpc.agents.Agent"
    if cls.uses_llm and not has_model:
        return f"workflow.roles.{role}.model: the role calls an LLM; name one of the models ({', '.join(models)})"
    if inline and cls.uses_llm:
        return f"workflow.roles.{role}.inline: only roles that call no LLM (uses_llm = False) can run inline"
    return None


def check_workflow_code(config: JobConfig) -> None:
    """Import every role's agent class and the metrics function; raise :class:`ConfigError`
    naming the key of the first one that does not load or is not what it must be."""
    paths = import_paths(config)
    add_import_paths(paths)
    wf = config.workflow
    for role, rc in wf.roles.items():
        key = f"workflow.roles.{role}.agent"
        problem = role_problem(role, _load(rc.agent, key, paths), rc.agent, config.role_model(role) is not None, rc.inline, config.models)
        if problem:
            raise ConfigError(problem)
    if wf.metrics:
        fn = _load(wf.metrics, "workflow.metrics", paths)
        if not callable(fn):
            raise ConfigError(f"workflow.metrics: {wf.metrics} is not callable")
