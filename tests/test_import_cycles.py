"""No import cycles in matrix_hpc (issue 22: one ran between config/job.py and config/checks.py).

A cycle counts every import a module makes: at module level, inside a function (a lazy
import), and under ``if TYPE_CHECKING:``; only a cycle made of typing-only imports alone
would be harmless, and there is none. The old cycle was a lazy import one way
(``job.load_config`` imported ``checks``) and a typing-only one back."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

Edges = dict[str, dict[str, bool]]
"""module -> {imported module: whether every import of it is typing-only}."""


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, package: str) -> Edges:
    """Every import between the modules of ``root/package`` (resolved, relative ones included)."""
    paths = {_module_name(root, p): p for p in (root / package).rglob("*.py")}
    graph: Edges = {}
    for name, path in paths.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, bool] = {}

        def add(target: str, typing_only: bool, edges: dict[str, bool] = edges, name: str = name) -> None:
            if target != name:
                edges[target] = edges.get(target, True) and typing_only

        def visit(node: ast.AST, typing_only: bool, pkg: str = pkg, add: Callable[[str, bool], None] = add) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.Import):
                    for alias in child.names:
                        if alias.name in paths:
                            add(alias.name, typing_only)
                elif isinstance(child, ast.ImportFrom):
                    base = pkg.split(".")[: len(pkg.split(".")) - (child.level - 1)] if child.level else []
                    target = ".".join([*base, *([child.module] if child.module else [])])
                    for alias in child.names:
                        sub = f"{target}.{alias.name}"
                        if sub in paths:
                            add(sub, typing_only)
                        elif target in paths:
                            add(target, typing_only)
                if isinstance(child, ast.If) and _is_type_checking(child):
                    for stmt in child.body:
                        visit(ast.Module(body=[stmt], type_ignores=[]), True)
                    for stmt in child.orelse:
                        visit(ast.Module(body=[stmt], type_ignores=[]), typing_only)
                else:
                    visit(child, typing_only)

        visit(ast.parse(path.read_text(), str(path)), False)
        graph[name] = edges
    return graph


def cycles(graph: Edges) -> list[list[str]]:
    """The import cycles (strongly connected groups of modules) with a runtime import in them."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            members = set(group)
            if len(group) > 1 and any(not tc for m in group for t, tc in graph[m].items() if t in members):
                found.append(sorted(group))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for v in graph:
            if v not in index:
                connect(v)
    finally:
        sys.setrecursionlimit(limit)
    return found


def test_matrix_hpc_has_no_import_cycle() -> None:
    graph = import_graph(REPO, "matrix_hpc")
    assert "matrix_hpc.config.checks" in graph and graph["matrix_hpc.config.checks"].get("matrix_hpc.config.job") is True
    assert cycles(graph) == []


def test_the_check_sees_the_old_config_cycle(tmp_path: Path) -> None:
    """The form the job <-> checks cycle had: a lazy import one way, a typing-only one back."""
    pkg = tmp_path / "cfg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "job.py").write_text("def load_config():\n    from .checks import check_job\n    return check_job\n")
    (pkg / "checks.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .job import JobConfig\ndef check_job(c): ...\n")
    assert cycles(import_graph(tmp_path, "cfg")) == [["cfg.checks", "cfg.job"]]
    (pkg / "job.py").write_text("def load_config(): ...\n")  # as today: checks needs job for typing only
    assert cycles(import_graph(tmp_path, "cfg")) == []


def test_each_config_module_imports_alone_in_a_fresh_interpreter() -> None:
    modules = sorted(_module_name(REPO, p) for p in (REPO / "matrix_hpc" / "config").glob("*.py"))
    code = "import importlib, sys; importlib.import_module(sys.argv[1])"
    for module in modules:  # one interpreter each: no module is imported first by another's import
        res = subprocess.run([sys.executable, "-c", code, module], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, f"import {module}: {res.stderr[-2000:]}"
