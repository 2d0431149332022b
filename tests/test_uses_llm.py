"""Whether a role calls an LLM is decided in one place (runtime/agent.py's ``uses_llm``): the
config check, the team spec's limits and the agent actor (its client and its call journal)
read it there, with one default. Three places read the class attribute with different
defaults (True, True, False) before."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest

from matrix_hpc.agents import Agent
from matrix_hpc.runtime.agent import uses_llm
from matrix_hpc.runtime.loader import role_problem
from matrix_hpc.runtime.spec import ClientSpec, RoleSpec, TeamSpec, _uses_llm

REPO = Path(__file__).resolve().parents[1]
HOME = REPO / "matrix_hpc" / "runtime" / "agent.py"


class Caller(Agent):
    """Says nothing: calls an LLM (the base's default)."""


class Quiet(Agent):
    uses_llm = False


class NotAnAgent:
    """No ``uses_llm`` at all (and no Agent)."""


@pytest.mark.parametrize(("cls", "expected"), [(Caller, True), (Quiet, False), (NotAnAgent, True)])
def test_the_config_check_the_team_spec_and_the_actor_agree(cls: type, expected: bool, tmp_path: Path) -> None:
    from matrix_hpc.runtime.actor import AgentActor

    path = f"{__name__}:{cls.__name__}"
    assert uses_llm(cls) is expected
    assert _uses_llm(path) is expected  # the team spec's limits
    assert _uses_llm(f"{__name__}:Missing") is True  # a class that does not load: the same default
    model = ClientSpec(name="m", served_name="m", urls=["http://127.0.0.1:9/v1"])  # never called
    spec = TeamSpec("r", "ns", {"a": RoleSpec(path, 1, 1, model="m")}, models={"m": model}, metrics=False, loop_lag_warn_s=0, journal_dir=str(tmp_path))
    if not issubclass(cls, Agent):  # refused by both, before anything is built
        assert "is not a subclass" in (role_problem("a", cls, path, False, False, ["m"]) or "")
        with pytest.raises(TypeError, match="not a matrix_hpc.agents.Agent subclass"):
            AgentActor.__ray_metadata__.modified_class(spec, "a", 0)
        assert list(tmp_path.iterdir()) == []  # no journal file left behind
        return
    # The config check: a role that calls an LLM names a model, and only one that calls none runs inline.
    assert (role_problem("a", cls, path, False, False, ["m"]) is not None) is expected
    assert (role_problem("a", cls, path, True, True, ["m"]) is not None) is expected
    # The actor: an LLM client and a call journal exactly for a role that calls one.
    actor = AgentActor.__ray_metadata__.modified_class(spec, "a", 0)
    assert (actor.agent.ctx.llm is not None) is expected
    assert (actor._replay is not None) is expected
    if actor._journal is not None:
        asyncio.run(actor._journal.close())


def _reads(path: Path) -> list[int]:
    """Lines of ``path`` that read an object's ``uses_llm`` (``x.uses_llm``, ``getattr(x, "uses_llm", ...)``)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr == "uses_llm":
            lines.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr":
            if any(isinstance(a, ast.Constant) and a.value == "uses_llm" for a in node.args[1:2]):
                lines.append(node.lineno)
    return lines


def test_no_other_module_reads_uses_llm() -> None:
    hits = [f"{p.relative_to(REPO)}:{n}" for p in sorted((REPO / "matrix_hpc").rglob("*.py")) if p != HOME for n in _reads(p)]
    assert hits == [], "read uses_llm through matrix_hpc.runtime.agent.uses_llm: " + ", ".join(hits)
    assert _reads(HOME)  # the check sees a read where there is one
