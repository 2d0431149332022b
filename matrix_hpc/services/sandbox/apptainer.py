"""Apptainer sandboxes: one long-lived instance per sandbox, one ``apptainer exec`` per command.

Driven directly as async subprocesses (the ``spython`` package only shells out to a
binary named ``singularity`` and calls ``sys.exit`` on some errors)::

    apptainer instance start --containall --writable-tmpfs --net --network none \\
        --bind <private dir>:/sandbox [binds] IMAGE NAME
    setpriv --pdeathsig KILL -- timeout -s KILL <wall+grace> \\
        apptainer exec --cleanenv --pwd /sandbox instance://NAME prlimit ... -- /bin/sh -c CMD
    apptainer instance stop NAME

The instance keeps its namespaces, its writable overlay, its ``/tmp``, ``/var/tmp`` and
``/dev/shm`` and any process an exec left running between the execs of a lease. None
of that can be wiped in place, so every lease gets a fresh instance: between leases
the pool stops the instance (which ends its PID namespace and every process in it),
checks it is gone, and starts a new one in the background.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ...config.sandbox import ApptainerOptions
from ._proc import pid_alive, run_argv, run_limited
from .base import (
    SANDBOX_DIR,
    ExecResult,
    Sandbox,
    SandboxLimits,
    SandboxRuntime,
    SandboxStartError,
    limit_argv,
    require_binaries,
)

__all__ = ["INSTANCE_PREFIX", "ApptainerOptions", "ApptainerRuntime", "ApptainerSandbox"]

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "Apptainer is not packaged for Debian 12: install the release .deb or .rpm from "
    "https://github.com/apptainer/apptainer/releases, load your cluster's module (`module load apptainer`), "
    "or set sandbox.runtime: bubblewrap. See containers/README.md."
)
INSTANCE_PREFIX = "mhpc"  # instance names: mhpc-<pool pid>-<slot>-<generation>
_WALL_GRACE_S = 2
_CONTROL_TIMEOUT_S = 120.0  # instance start/stop: pulling a SIF over a shared FS can be slow


class ApptainerRuntime(SandboxRuntime):
    name = "apptainer"

    def __init__(self, options: ApptainerOptions) -> None:
        self.options = options
        self._bins: dict[str, str] = {}

    def check(self) -> None:
        self._bins = require_binaries("apptainer", ["apptainer", "setpriv", "timeout"], INSTALL_HINT)
        if not self.options.image:
            raise SandboxStartError("sandbox.apptainer.image: required for the apptainer runtime (a .sif built from containers/)")
        if not Path(self.options.image).exists():
            raise SandboxStartError(f"sandbox.apptainer.image: no such file {self.options.image} (build it: see containers/README.md)")

    def create(self, slot: int, workdir: Path, generation: int) -> ApptainerSandbox:
        if not self._bins:
            self.check()
        return ApptainerSandbox(slot=slot, workdir=workdir, generation=generation, runtime=self)

    @property
    def apptainer(self) -> str:
        return self._bins["apptainer"]

    def start_argv(self, instance: str, workdir: Path) -> list[str]:
        argv = [self.apptainer, "instance", "start", "--containall", "--writable-tmpfs", "--bind", f"{workdir}:{SANDBOX_DIR}"]
        if not self.options.network:
            argv += ["--net", "--network", "none"]  # allowed for unprivileged users since Apptainer 1.1
        for spec in self.options.binds:
            argv += ["--bind", spec]
        argv += [*self.options.instance_args, self.options.image, instance]
        return argv

    def exec_argv(self, instance: str, limits: SandboxLimits, cmd: str | list[str], env: dict[str, str] | None) -> list[str]:
        b = self._bins
        argv = [b["setpriv"], "--pdeathsig", "KILL", "--", b["timeout"], "-s", "KILL", str(int(limits.wall_s) + _WALL_GRACE_S)]
        argv += [self.apptainer, "exec", "--cleanenv", "--pwd", SANDBOX_DIR, "--env", f"HOME={SANDBOX_DIR}"]
        for key, value in {**self.options.env, **(env or {})}.items():
            argv += ["--env", f"{key}={value}"]
        argv += [f"instance://{instance}", *limit_argv(limits, "prlimit")]
        argv += ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        return argv

    async def list_instances(self) -> list[str]:
        raw = await run_argv([self.apptainer, "instance", "list", "--json"], deadline_s=_CONTROL_TIMEOUT_S, max_output=1 << 20)
        if raw.exit_code != 0:
            return []
        try:
            return [i["instance"] for i in json.loads(raw.stdout or b"{}").get("instances", [])]
        except (ValueError, KeyError, TypeError):
            return []

    async def stop_instance(self, instance: str, force: bool = False) -> None:
        raw = await run_argv([self.apptainer, "instance", "stop", *(["--force"] if force else []), instance], deadline_s=_CONTROL_TIMEOUT_S, max_output=1 << 16)
        if raw.exit_code != 0:
            log.warning("apptainer instance stop %s failed (%s); forcing", instance, raw.stderr.decode(errors="replace").strip()[:200])
            await run_argv([self.apptainer, "instance", "stop", "--force", instance], deadline_s=_CONTROL_TIMEOUT_S, max_output=1 << 16)

    async def sweep(self) -> int:
        """Stop instances left by pools on this host that no longer run (a killed pool's)."""
        stopped = 0
        for name in await self.list_instances():
            parts = name.split("-")
            if len(parts) == 4 and parts[0] == INSTANCE_PREFIX and parts[1].isdigit() and not pid_alive(int(parts[1])):
                await self.stop_instance(name)
                stopped += 1
        return stopped


@dataclass
class ApptainerSandbox(Sandbox):
    runtime: ApptainerRuntime | None = field(default=None, repr=False)

    @property
    def instance(self) -> str:
        return f"{INSTANCE_PREFIX}-{os.getpid()}-{self.slot}-{self.generation}"

    async def start(self) -> None:
        assert self.runtime is not None
        self.make_workdir()
        argv = self.runtime.start_argv(self.instance, self.workdir)
        raw = await run_argv(argv, deadline_s=_CONTROL_TIMEOUT_S, max_output=1 << 16)
        if raw.exit_code != 0:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise SandboxStartError(f"`{shlex.join(argv)}` failed (exit {raw.exit_code}): {raw.stderr.decode(errors='replace').strip()[-500:]}")

    async def exec(self, cmd: str | list[str], limits: SandboxLimits, stdin: bytes | None = None, env: dict[str, str] | None = None) -> ExecResult:
        assert self.runtime is not None
        argv = self.runtime.exec_argv(self.instance, limits, cmd, env)
        return await run_limited(argv, limits, stdin)

    async def reset(self) -> str | None:
        return "per_lease"  # overlay, /tmp and processes live in the instance: only a new one is fresh

    async def stop(self) -> None:
        assert self.runtime is not None
        try:
            await self.runtime.stop_instance(self.instance)
            if self.instance in await self.runtime.list_instances():
                await self.runtime.stop_instance(self.instance, force=True)
                if self.instance in await self.runtime.list_instances():
                    log.error("apptainer instance %s survived `instance stop --force`", self.instance)
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
