"""A task's tool environment inside a leased sandbox: ``/sandbox/db.json`` + ``/sandbox/tools.py``.

Every tool call is one sandboxed ``python3 tools.py db.json NAME ARGS``; the
database file lives in the sandbox's private directory between the calls of a
step and is read back at the end of it, so the task carries it to the next step.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from matrix_hpc.services.sandbox import SandboxLimits, SandboxSession

from .protocol import ToolCall

__all__ = ["TOOLS_SOURCE", "SandboxToolEnv", "ToolExec", "load_base_db"]

log = logging.getLogger(__name__)

TOOLS_SOURCE = Path(__file__).resolve().parent / "env" / "tools.py"
DEFAULT_DB = Path(__file__).resolve().parent / "data" / "db.json"
MAX_RESULT_CHARS = 2000  # what the model sees of one tool's answer


def load_base_db(path: str | None = None) -> dict[str, Any]:
    """The shop database every scenario starts from (``data/db.json`` unless ``path``)."""
    p = Path(path) if path else DEFAULT_DB
    if not p.is_absolute():
        p = Path(__file__).resolve().parent / p
    return json.loads(p.read_text())


@dataclass
class ToolExec:
    """One tool call as it ran in the sandbox (kept in the record)."""

    tool: str
    arguments: dict[str, Any]
    ok: bool
    exit_code: int
    killed_reason: str | None
    duration_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SandboxToolEnv:
    def __init__(self, session: SandboxSession, limits: SandboxLimits | None = None) -> None:
        self.session = session
        self.limits = limits
        self.execs: list[ToolExec] = []

    async def load(self, db: dict[str, Any]) -> None:
        await self.session.write_file("tools.py", TOOLS_SOURCE.read_bytes())
        await self.session.write_file("db.json", json.dumps(db).encode())

    async def call(self, call: ToolCall) -> str:
        """Run one call; the text the assistant sees (the tool's JSON answer, or why it failed)."""
        argv = ["python3", "tools.py", "db.json", call.name, "-"]
        res = await self.session.exec(argv, self.limits, stdin=json.dumps(call.arguments).encode())
        self.execs.append(ToolExec(call.name, call.arguments, res.ok, res.exit_code, res.killed_reason, round(res.duration_s, 4)))
        if res.ok:
            return res.stdout.strip()[:MAX_RESULT_CHARS]
        why = f"killed ({res.killed_reason})" if res.killed_reason else f"exit status {res.exit_code}"
        log.info("tool %s failed in the sandbox: %s: %s", call.name, why, res.stderr[-300:])
        return json.dumps({"ok": False, "error": f"the tool failed: {why}"})

    async def database(self) -> dict[str, Any]:
        db: dict[str, Any] = json.loads(await self.session.read_file("db.json"))
        return db
