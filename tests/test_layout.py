"""The run layout (store/layout.py): one module owns every path of a run.

The paths are pinned (an old output must keep working: resume reads what earlier
versions wrote), and no other module of the package spells them.
"""

from __future__ import annotations

import ast
from pathlib import Path

from matrix_hpc.store.layout import JobLayout, PartLayout, RunLayout, engine_log

REPO = Path(__file__).resolve().parents[1]
LAYOUT = REPO / "matrix_hpc" / "store" / "layout.py"


def test_run_layout_paths_are_pinned(tmp_path: Path) -> None:
    run = RunLayout(tmp_path)
    assert run == RunLayout(str(tmp_path))  # a str root is a Path
    assert run.store_json == tmp_path / "store.json"
    assert run.run_json == tmp_path / "run.json"
    assert run.services_json == tmp_path / "services.json"
    assert run.prometheus_targets == tmp_path / "prometheus_targets.json"
    assert run.journal == tmp_path / "journal"
    assert run.logs == tmp_path / "logs"
    assert run.agents_log == tmp_path / "logs" / "agents.log"
    assert run.secrets == tmp_path / ".secrets"
    assert run.llm_key("ab12cd34") == tmp_path / ".secrets" / "llm-ab12cd34.key"
    assert run.node_probe("7.1") == tmp_path / ".nodes" / "7.1"
    assert run.slurm == tmp_path / "slurm"
    assert engine_log(run.logs, "vllm", 8001) == tmp_path / "logs" / "vllm-8001.log"
    assert engine_log(run.logs, "embedded-engine", 8002) == tmp_path / "logs" / "embedded-engine-8002.log"

    part = run.part(0)
    assert part == PartLayout(tmp_path / "part-000") and part.name == "part-000"
    assert run.part(12).dir == tmp_path / "part-012"
    assert part.data == tmp_path / "part-000" / "data.zarr"
    assert part.commit == tmp_path / "part-000" / "commit.json"
    assert part.lock == tmp_path / "part-000" / "writer.lock"
    assert part.lease == tmp_path / "part-000" / "writer.lease"


def test_job_layout_paths_are_pinned(tmp_path: Path) -> None:
    run = RunLayout(tmp_path / "out")
    assert run.job() == JobLayout(tmp_path / "out" / "slurm")
    assert run.job(tmp_path / "jobs") == run.job(str(tmp_path / "jobs")) == JobLayout(tmp_path / "jobs")
    job = run.job()
    j = tmp_path / "out" / "slurm"
    assert job.jobs_json == j / "jobs.json"
    assert job.submitit == j / "submitit" / "%j"
    assert job.rendezvous("7.0") == j / "rendezvous" / "7.0"
    assert job.logs == j / "logs"
    assert job.ray_log("7.0", 2) == j / "logs" / "ray-7.0-rank2.log"
    assert job.cluster_file("7.0") == j / "cluster-7.0.json"
    assert job.secrets == j / ".secrets"
    assert job.ray_token("7.1") == j / ".secrets" / "ray-7.1.token"


def test_parts_and_tokens_found_on_disk(tmp_path: Path) -> None:
    """An existing output's parts (the store's and a resume's view) and a job's tokens, as on disk."""
    run = RunLayout(tmp_path)
    assert run.parts() == []
    (tmp_path / "part-001").mkdir()
    (tmp_path / "part-000" / "data.zarr").mkdir(parents=True)
    (tmp_path / "part-000" / "data.zarr" / "zarr.json").write_text("{}")
    (tmp_path / "part-002").write_text("a file, not a part")
    assert [p.name for p in run.parts()] == ["part-000", "part-001"]
    assert [p.has_data for p in run.parts()] == [True, False]

    job = run.job()
    job.secrets.mkdir(parents=True)
    for key in ("7.0", "7.1", "8.0"):
        job.ray_token(key).write_text("t")
    assert job.ray_tokens("7") == [job.ray_token("7.0"), job.ray_token("7.1")]


# The names only store/layout.py may spell in code (docstrings and comments may name them).
_FILE_NAMES = {
    "run.json", "store.json", "services.json", "commit.json", "writer.lock", "writer.lease", "data.zarr",
    "prometheus_targets.json", "agents.log", "jobs.json", ".secrets", ".nodes", "journal", "logs", "submitit",
    "rendezvous", "part-000",
}  # fmt: skip
_PREFIXES = ("part-", "cluster-", "ray-", "llm-", "vllm-", "embedded-engine-")
"""f-strings and globs a run path was built from (``f"part-{i:03d}"``, ``f"cluster-{key}.json"``)."""


def _path_strings(path: Path) -> list[tuple[int, str]]:
    """String constants of ``path`` that spell a run path: one of the names, or an f-string or glob
    starting with a path prefix (a bare string statement, like a docstring, is prose)."""
    tree = ast.parse(path.read_text(), str(path))
    prose = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    hits: list[tuple[int, int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            head = node.values[0] if node.values else None
            if isinstance(head, ast.Constant) and isinstance(head.value, str) and head.value.startswith(_PREFIXES):
                hits.append((node.lineno, node.col_offset, head.value))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            text = node.value
            if text in _FILE_NAMES or (text.startswith(_PREFIXES) and "*" in text):
                hits.append((node.lineno, node.col_offset, text))
    return [(line, text) for line, _col, text in sorted(hits)]


def test_no_module_but_the_layout_spells_a_run_path() -> None:
    """Every path of a run comes from store/layout.py: no module builds one by hand (eight did:
    job.py, serve.py, the store, the view, the Slurm bootstrap, credentials, health, the actor)."""
    files = [p for p in (REPO / "matrix_hpc").rglob("*.py") if p != LAYOUT]
    hits = [f"{p.relative_to(REPO)}:{line}: {text!r}" for p in files for line, text in _path_strings(p)]
    assert files and not hits, "\n".join(hits)


def test_the_check_sees_a_hand_built_path(tmp_path: Path) -> None:
    """The check above finds each way a path was built by hand (so its silence means something)."""
    src = tmp_path / "m.py"
    src.write_text(
        '"""Writes run.json and part-000/commit.json (prose)."""\n'
        "import os\n"
        "def f(root, key, i):\n"
        '    """Reads logs/agents.log (prose)."""\n'
        '    a = root / "run.json"\n'
        '    b = root / f"part-{i:03d}"\n'
        '    c = os.path.join(root, "logs", "agents.log")\n'
        '    d = root.glob("part-*")\n'
        '    e = root / f"cluster-{key}.json"\n'
        '    return a, b, c, d, e, "kind: slurm"\n'
    )  # fmt: skip
    assert [text for _line, text in _path_strings(src)] == ["run.json", "part-", "logs", "agents.log", "part-*", "cluster-"]
