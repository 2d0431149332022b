"""One node's Ray daemons, started with ``ray start --block`` and stopped by process group.

``ray stop`` would stop every Ray on the machine, including another job's; this
process group holds exactly this node's raylet, GCS (on the head) and agents.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ...labels import NODE_IP_ENV
from ..ray_settings import RAY_SYSTEM_CONFIG, ray_start_daemon_flags
from .ports import RayPorts

__all__ = ["RayNode"]

log = logging.getLogger(__name__)


class RayNode:
    def __init__(self, node_ip: str, ports: RayPorts, resources: dict[str, float], temp_dir: str, log_path: Path) -> None:
        self.node_ip, self.ports, self.resources = node_ip, ports, resources
        self.temp_dir, self.log_path = temp_dir, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.node_ip}:{self.ports.gcs}"

    def start(self, head_address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
        """Head when ``head_address`` is None, else a worker joining it."""
        ray = str(Path(sys.executable).parent / "ray")
        cmd = [ray, "start", "--block", f"--node-ip-address={self.node_ip}", f"--resources={json.dumps(self.resources)}", "--disable-usage-stats"]
        cmd += ray_start_daemon_flags(head=head_address is None)
        if head_address is None:
            cmd += ["--head", "--include-dashboard=false", f"--temp-dir={self.temp_dir}", *self.ports.args(head=True)]
            cmd.append(f"--system-config={json.dumps(RAY_SYSTEM_CONFIG)}")
        else:
            cmd += [f"--address={head_address}", *self.ports.args(head=False)]
        if num_cpus is not None:
            cmd.append(f"--num-cpus={num_cpus}")
        if num_gpus is not None:
            cmd.append(f"--num-gpus={num_gpus}")
        # Servers started by actors on this node bind to this address (see labels.NODE_IP_ENV). Ray's
        # token (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH) comes with the environment: bootstrap sets it.
        # Usage statistics off: the head's API server would otherwise report the cluster to
        # Ray's servers from a compute node (the one module it loads with --include-dashboard=false).
        env = {**os.environ, NODE_IP_ENV: self.node_ip, "RAY_USAGE_STATS_ENABLED": "0"}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.info("ray %s on %s (pid %d), log %s", "head" if head_address is None else "worker", self.node_ip, self.proc.pid, self.log_path)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_head_ready(self, timeout_s: float = 120.0) -> None:
        """Until the GCS accepts connections (ray start --block does not say when)."""
        import socket

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"ray head exited during start-up; see {self.log_path}")
            try:
                with socket.create_connection((self.node_ip, self.ports.gcs), timeout=1.0):
                    return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"ray head not listening on {self.address} after {timeout_s:.0f}s; see {self.log_path}")

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the node's process group, then SIGKILL what is left of it."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        log.info("ray on %s stopped", self.node_ip)
