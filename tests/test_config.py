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
        (["run", str(CONFIG), "run.max_attempts=abc"], "matrix-hpc: config error: run.max_attempts: expected int, got 'abc'"),
        (["run", "/nonexistent/job.yaml"], "matrix-hpc: config error: config file not found: /nonexistent/job.yaml"),
    ],
)
def test_cli_prints_one_line_and_exits_2(args: list[str], expected: str) -> None:
    res = subprocess.run([str(BIN / "matrix-hpc"), *args], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith(expected)


def test_cli_missing_dataset_is_one_line(tmp_path: Path) -> None:
    res = subprocess.run(
        [str(BIN / "matrix-hpc"), "run", str(CONFIG), "dataset.path=/nonexistent.jsonl", f"output.path={tmp_path}/o"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1
    assert res.stderr.strip() == "matrix-hpc: error: dataset.path: no such file /nonexistent.jsonl"


# --- several models ------------------------------------------------------------

MODELS = [
    "~llm",  # drop the shorthand (see _multi)
    "models.big.engine=vllm",
    "models.big.vllm.model=/models/big",
    "models.big.vllm.tensor_parallel_size=4",
    "models.big.replicas=2",
    "models.small.engine=external",
    "models.small.base_urls=[http://127.0.0.1:9/v1]",
    "models.small.api_key_env=SMALL_KEY",
    "workflow.roles.teacher.model=big",
    "workflow.roles.student.model=small",
]


def _multi(tmp_path: Path, extra: list[str] = ()) -> tuple[Path, list[str]]:  # type: ignore[assignment]
    """The collab config without its ``llm`` section (overrides cannot delete a key) and model overrides."""
    import yaml

    cfg = yaml.safe_load(CONFIG.read_text())
    del cfg["llm"]
    cfg["dataset"]["path"] = str(CONFIG.parent / cfg["dataset"]["path"])
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, [o for o in MODELS if not o.startswith("~")] + list(extra)


def test_models_roles_and_sampling_load(tmp_path: Path) -> None:
    path, overrides = _multi(tmp_path, ["workflow.roles.student.sampling.temperature=0", "workflow.roles.student.sampling.stop=[END]",
                                        "workflow.roles.student.sampling.extra={top_k: 4}"])  # fmt: skip
    cfg = load_config(path, overrides)
    assert cfg.llm is None and set(cfg.models) == {"big", "small"}
    assert cfg.models["big"].served_name == "big" and cfg.models["big"].allocation_gpus == 8
    assert cfg.role_model("teacher") == "big" and cfg.role_model("judge") is None
    from matrix_hpc.config import resolve_sampling

    s = resolve_sampling(cfg.models["small"], cfg.workflow.roles["student"].sampling)
    assert s.request_fields() == {"max_tokens": 256, "temperature": 0.0, "stop": ["END"], "top_k": 4}
    # The saved form (run.json's config) loads back to the same models.
    import yaml

    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(again).models == cfg.models


@pytest.mark.parametrize(
    "extra, message",
    [
        (["workflow.roles.teacher.model=huge"], "workflow.roles.teacher.model: unknown model 'huge' (models: big, small)"),
        (["workflow.roles.student.sampling.temperature=hot"], "workflow.roles.student.sampling.temperature: expected float, got 'hot'"),
        (["workflow.roles.student.sampling.max_tokens=many"], "workflow.roles.student.sampling.max_tokens: expected int, got 'many'"),
        (["workflow.roles.student.sampling.stop=7"], "workflow.roles.student.sampling.stop: expected a list, got int"),
        (["workflow.roles.student.sampling.top_p=1.5"], "workflow.roles.student.sampling.top_p: must be in (0, 1], got 1.5"),
        (["workflow.roles.student.sampling.extra={model: x}"], "workflow.roles.student.sampling.extra.model: set by the runtime"),
        (["workflow.roles.student.sampling.tempreature=1"], "unknown key workflow.roles.student.sampling.tempreature"),
        (["llm.engine=embedded"], "llm: give either llm (one model) or models (several), not both"),
        (["models.small.base_urls=[]"], "models.small.base_urls: required when models.small.engine is 'external'"),
        (["models.small.api_key_env=sk-abc123"], "models.small.api_key_env: expected the name of an environment variable, not a key"),
        (
            ["cluster.kind=slurm", "cluster.slurm.gpu_nodes=1", "cluster.slurm.gpus_per_node=4"],
            "models: 8 GPUs asked (big 8; replicas x tensor x pipeline), the allocation has 4 (cluster.slurm gpu nodes x gpus_per_node)",
        ),
        (
            ["cluster.kind=slurm", "cluster.slurm.gpu_nodes=1", "cluster.slurm.gpus_per_node=2"],
            "models.big.vllm.tensor_parallel_size: a replica needs 4 GPUs on one node, cluster.slurm.gpus_per_node is 2",
        ),
        (["workflow.params.sandbox={size: 2}"], "workflow.params.sandbox: the sandbox settings moved to the top-level sandbox section"),
        (["sandbox.size=0"], "sandbox.size: must be >= 1, got 0"),
        (["sandbox.limits.wall_s=soon"], "sandbox.limits.wall_s: expected float, got 'soon'"),
    ],
)
def test_model_and_sampling_mistakes_name_the_key(tmp_path: Path, extra: list[str], message: str) -> None:
    path, overrides = _multi(tmp_path, extra)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_gpus_that_fit_the_allocation_load(tmp_path: Path) -> None:
    path, overrides = _multi(tmp_path, ["cluster.kind=slurm", "cluster.slurm.gpu_nodes=2", "cluster.slurm.gpus_per_node=4"])
    assert load_config(path, overrides).models["big"].allocation_gpus == 8  # 2 replicas x 4 on 2 nodes x 4
    cpu = ["cluster.kind=slurm", "cluster.slurm.gpu_nodes=1", "cluster.slurm.gpus_per_node=1", "models.big.vllm.device=cpu"]
    assert load_config(path, overrides[:0] + _multi(tmp_path)[1] + cpu).models["big"].allocation_gpus == 0


def test_a_model_no_role_uses_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path, overrides = _multi(tmp_path, ["models.judge.engine=external", "models.judge.base_urls=[http://127.0.0.1:9/v1]"])
    with caplog.at_level("WARNING", logger="matrix_hpc.config.checks"):
        cfg = load_config(path, overrides)
    assert "judge" in cfg.models
    assert [r.getMessage() for r in caplog.records] == ["models.judge: no role uses this model (name it in workflow.roles.NAME.model)"]


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["workflow.roles.teacher.model=huge"], "matrix-hpc: config error: workflow.roles.teacher.model: unknown model 'huge' (models: big, small)"),
        (
            ["workflow.roles.student.sampling.temperature=hot"],
            "matrix-hpc: config error: workflow.roles.student.sampling.temperature: expected float, got 'hot'",
        ),
        (["cluster.kind=slurm", "cluster.slurm.gpu_nodes=1", "cluster.slurm.gpus_per_node=4"], "matrix-hpc: config error: models: 8 GPUs asked"),
    ],
)
def test_cli_model_mistakes_print_one_line_and_exit_2(tmp_path: Path, extra: list[str], expected: str) -> None:
    path, overrides = _multi(tmp_path, extra)
    res = subprocess.run([str(BIN / "matrix-hpc"), "run", str(path), *overrides, f"output.path={tmp_path}/o"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith(expected), res.stderr
