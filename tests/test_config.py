"""The job spec: overrides, and one clear line naming the key for every mistake."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from matrix_hpc.config import ConfigError, load_config, parse_overrides

from .conftest import BIN, REPO

CONFIG = REPO / "workflows" / "collab_reasoning" / "config.yaml"


def test_bundled_config_loads_with_overrides() -> None:
    cfg = load_config(CONFIG, ["run.max_in_flight=500", "output.path=/tmp/out", "workflow.roles.teacher.instances=3", "llm.temperature=0"])
    assert cfg.run.max_in_flight == 500
    assert cfg.output.path == "/tmp/out"
    assert cfg.workflow.roles["teacher"].instances == 3
    assert cfg.llm is not None and cfg.llm.temperature == 0.0 and isinstance(cfg.llm.temperature, float)
    assert cfg.models == {"default": cfg.llm}  # the llm shorthand is one model named llm.model
    assert cfg.workflow.roles["judge"].agent.endswith(":Judge")


def test_bare_off_in_yaml_means_the_string() -> None:
    assert load_config(CONFIG, ["run.progress=off"]).run.progress == "off"


def test_overrides_parse_yaml_values() -> None:
    assert parse_overrides(["a.b=1", "a.c=[x, y]", "d=null", "e=text"]) == {"a": {"b": 1, "c": ["x", "y"]}, "d": None, "e": "text"}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["novalue"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("run.max_inflight=5", "unknown key run.max_inflight"),
        ("run.max_in_flight=many", "run.max_in_flight: expected int, got 'many'"),
        ("llm.engine=gpu", "llm.engine: expected one of embedded, vllm, external, got 'gpu'"),
        ("workflow.roles.teacher.instances=0", "workflow.roles.teacher.instances: must be >= 1"),
        ("workflow.entry=nobody", "workflow.entry: 'nobody' is not one of workflow.roles"),
        ("dataset.required_fields=question", "dataset.required_fields: expected a list"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, [override])
    assert message in str(err.value)


def test_missing_required_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("workflow: {name: x, entry: a, roles: {a: {agent: 'm:A'}}}\n")
    with pytest.raises(ConfigError, match="^dataset: required key is missing$"):
        load_config(path)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["run", str(CONFIG), "run.bogus=1"], "matrix-hpc: config error: unknown key run.bogus"),
        (["run", str(CONFIG), "run.seed=abc"], "matrix-hpc: config error: run.seed: expected int, got 'abc'"),
        (["run", "/nonexistent/job.yaml"], "matrix-hpc: config error: config file not found: /nonexistent/job.yaml"),
    ],
)
def test_cli_prints_one_line_and_exits_2(args: list[str], expected: str) -> None:
    res = subprocess.run([str(BIN / "matrix-hpc"), *args], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith(expected)


def test_cli_missing_dataset_is_one_line(tmp_path: Path) -> None:
    res = subprocess.run([str(BIN / "matrix-hpc"), "run", str(CONFIG), "dataset.path=/nonexistent.jsonl", f"output.path={tmp_path}/o"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert res.stderr.strip() == "matrix-hpc: error: dataset.path: no such file /nonexistent.jsonl"
