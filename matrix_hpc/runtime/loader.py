"""Finding a workflow's code: its import path, and a check of every ``module:attr`` it names.

A workflow may live outside the repo (``my_wf/config.yaml`` next to ``my_wf/agents.py``).
``workflow.python_path`` (default ``["."]``: the config file's folder) is put on the import
path of the driver here and of every Ray worker on every node (``start_ray`` sets it in
the job's ``runtime_env``), so no ``PYTHONPATH`` is needed. :func:`check_workflow_code`
imports the agent classes and the metrics function, and checks the roles' params against
what their agents declare (:mod:`.params`), before Ray or an engine starts, so a typo
fails in a second with the key that names it.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import inspect
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..config import ConfigError, JobConfig
from .agent import Agent, uses_llm
from .params import check_params

__all__ = ["add_import_paths", "check_workflow_code", "import_paths", "load_object"]


def load_object(path: str) -> Any:
    """Import ``module:attr``."""
    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"cannot load {path!r}: {exc}") from exc


def import_paths(config: JobConfig) -> list[str]:
    """The folders a workflow's modules are imported from, on the driver and every worker:

    1. ``workflow.python_path``, relative entries from the config file's folder (default: that folder);
    2. for a module the config names (``pkg.agents:Writer``) whose top package is found in none
       of those and is not installed: the config folder's parent when the folder itself is
       named ``pkg`` (a copy of a bundled workflow, named as the bundled ones are), else the
       current folder when ``pkg`` is there (as ``python -m`` has it).

    Only a folder that holds a named package is added: each one may hide installed modules."""
    base = Path(config.source_file).parent.resolve() if config.source_file else Path.cwd()
    out: list[str] = []
    for entry in config.workflow.python_path:
        p = Path(os.path.expanduser(entry))
        p = (p if p.is_absolute() else base / p).resolve()
        if str(p) not in out:
            out.append(str(p))
    cwd = Path.cwd().resolve()
    candidates = {str(base.parent), str(cwd)}  # on sys.path already after an earlier call: not "installed"
    for top in _named_packages(config):
        if any(_holds(Path(d), top) for d in out) or _installed(top, candidates):
            continue
        where = base.parent if base.name == top else cwd if _holds(cwd, top) else None
        if where is not None and str(where) not in out:
            out.append(str(where))
    return out


def _named_packages(config: JobConfig) -> list[str]:
    """Top-level package names of every ``module:attr`` the workflow names (agents, metrics)."""
    wf = config.workflow
    named = [rc.agent for rc in wf.roles.values()] + ([wf.metrics] if wf.metrics else [])
    return list(dict.fromkeys(path.partition(":")[0].split(".")[0] for path in named if path))


def _holds(folder: Path, top: str) -> bool:
    return (folder / f"{top}.py").is_file() or (folder / top).is_dir()


def _installed(top: str, exclude: set[str]) -> bool:
    """Importable from this interpreter's path less ``exclude`` (the bundled ``workflows``, an
    installed package); modules imported already do not count (``sys.modules`` is not read)."""
    path = [p for p in sys.path if str(Path(p or ".").resolve()) not in exclude]
    finders = [f for f in sys.meta_path if f is not importlib.machinery.PathFinder]  # editable installs' finders
    try:
        if importlib.machinery.PathFinder.find_spec(top, path) is not None:
            return True
        return any(getattr(f, "find_spec", None) and f.find_spec(top, None) is not None for f in finders)
    except (ImportError, ValueError):
        return False


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
        import difflib  # here: an actor imports it only for a misspelt name

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
    if uses_llm(cls) and not has_model:
        return f"workflow.roles.{role}.model: the role calls an LLM; name one of the models ({', '.join(models)})"
    if inline and uses_llm(cls):
        return f"workflow.roles.{role}.inline: only roles that call no LLM (uses_llm = False) can run inline"
    return None


def check_workflow_code(config: JobConfig) -> None:
    """Import every role's agent class and the metrics function; raise :class:`ConfigError`
    naming the key of the first one that does not load or is not what it must be."""
    paths = import_paths(config)
    add_import_paths(paths)
    wf = config.workflow
    classes: dict[str, tuple[Any, dict[str, Any]]] = {}
    for role, rc in wf.roles.items():
        key = f"workflow.roles.{role}.agent"
        cls = _load(rc.agent, key, paths)
        problem = role_problem(role, cls, rc.agent, config.role_model(role) is not None, rc.inline, config.models)
        if problem:
            raise ConfigError(problem)
        classes[role] = (cls, rc.params)
    check_params(classes, wf.params)  # a typo in params: a config error now, not a setting silently ignored
    if wf.metrics:
        fn = _load(wf.metrics, "workflow.metrics", paths)
        if not callable(fn):
            raise ConfigError(f"workflow.metrics: {wf.metrics} is not callable")
