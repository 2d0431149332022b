"""A real 3-node Slurm cluster of separate "hosts" on one machine, for integration tests.

``SlurmCluster(base, shared=[...])`` writes its configuration under ``base`` and
starts, as children of this process and each tracked by pid:

* a private network (``tests/netns.py``): a bridge ``mhpc<pid>s<n>`` on this host with
  ``10.x.y.1/24`` (a /24 no host interface or route uses), and one network namespace
  per host (``mhpc-<pid>-<n>-ctl``, ``mhpc-<pid>-<n>-n1`` ...) holding a veth on that bridge:
  ``ctl`` is ``10.x.y.2``, node ``nI`` is ``10.x.y.(10+I)``. No namespace has a default
  route and IP forwarding is untouched, so nothing is bound to or sent through the
  host's own interfaces; test clients (``sbatch``, ``sacct``, pytest itself) reach the
  hosts through the bridge address;
* on the ``ctl`` host (its namespace, hostname ``ctl``): ``munged`` with its own key and
  socket in ``base/munge`` (a Unix socket: every host uses it), ``mariadbd`` (a private
  datadir and socket, ``--skip-networking``), ``slurmdbd`` and ``slurmctld``. So every
  process of the cluster lives in one of its namespaces, which is what lets a later
  session clean up after one that was SIGKILLed;
* one ``slurmd`` per node (``n1``, ``n2``, ``n3``), each a separate host as far as its
  jobs can tell: its own network namespace and address, hostname (UTS namespace),
  ``/etc/hosts`` (every host's name and bridge address), boot id, SysV IPC, PID namespace (a small init
  reaps orphans; killing it kills the whole node at once, see ``kill_node``), and
  private mounts: a fresh tmpfs on ``/tmp`` and on ``/dev/shm``. Shared, as on a real
  cluster: every path outside ``/tmp``, and, bind-mounted back into the node's ``/tmp``
  at the same path, the checkout and the Python environment wherever they are (a clone
  under ``/tmp`` too: ``node_shared_dirs``) and the ``shared`` directories (``base``
  always; by default also ``base``'s parent, pytest's base temp dir when ``base`` comes
  from ``tmp_path_factory.mktemp``: it holds the tests' job and output dirs).

Each session removes what a dead earlier session left (namespaces and links are
named after the owner's pid; live owners' are left alone), and ``stop()`` deletes
its own. Everything runs as root (Slurm jobs too). Every daemon logs to
``base/log``; logs and state stay after ``stop()`` so a failing test can be inspected.

The daemons' processes and each node's namespace set-up are in ``tests/slurm_procs.py``;
the configuration files in ``tests/slurm_conf.py``.

Usage::

    with SlurmCluster(tmp_path) as cluster:
        job = cluster.sbatch("-N2", "--wrap", "srun hostname")
        cluster.wait_job(job, {"COMPLETED"})
        cluster.node_exec("n1", ["ls", "/tmp"])     # a command on a node

Client commands need ``cluster.env`` (``SLURM_CONF`` points at the private
``slurm.conf``); ``cluster.activate()`` sets it in ``os.environ`` for in-process
users such as submitit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .netns import TestNet
from .slurm_conf import write_configs
from .slurm_procs import NODE_INIT, NODE_SETUP, Daemon, alive, mnt_ns, pids_in_mnt_ns, pids_in_pidns, tail, terminate

TIMES: dict[str, list[float]] = {}

REPO = Path(__file__).resolve().parent.parent


def node_shared_dirs(extra: Iterable[str | os.PathLike[str]]) -> list[str]:
    """The directories under ``/tmp`` that every node binds back into its private ``/tmp``:
    ``extra``, and always the checkout and the Python environment the tests run from
    (a clone or a venv under ``/tmp`` would otherwise be invisible on the nodes, whose
    ``slurmd`` then fails with ``exec: <checkout>/.venv/bin/python: not found``). Outermost
    directories only; paths outside ``/tmp`` are shared anyway."""
    wanted = [*extra, REPO, sys.prefix, sys.base_prefix, Path(sys.executable).parent]
    dirs = sorted({str(Path(d).resolve()) for d in wanted if str(Path(d).resolve()).startswith("/tmp/")})
    return [d for d in dirs if not any(d.startswith(o + "/") for o in dirs)]


"""Durations the Slurm tests measured (printed when the session's cluster stops)."""


def note_time(what: str, seconds: float) -> None:
    TIMES.setdefault(what, []).append(seconds)


# binary -> the Debian package that ships it
BINARIES = {
    "munged": "munge",
    "munge": "munge",
    "mariadbd": "mariadb-server",
    "mariadb-install-db": "mariadb-server",
    "slurmdbd": "slurmdbd",
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "sbatch": "slurm-client",
    "srun": "slurm-client",
    "squeue": "slurm-client",
    "sinfo": "slurm-client",
    "scontrol": "slurm-client",
    "scancel": "slurm-client",
    "sacct": "slurm-client",
    "unshare": "util-linux",
    "nsenter": "util-linux",
    "ip": "iproute2",
}
DEBIAN_PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "slurmdbd", "mariadb-server"]
SBIN_DIRS = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
PLUGIN_DIRS = ["/usr/lib/x86_64-linux-gnu/slurm-wlm", "/usr/lib/aarch64-linux-gnu/slurm-wlm", "/usr/lib/slurm"]


class SlurmClusterError(RuntimeError):
    pass


def wait_until(pred: Callable[[], Any], timeout: float, what: str, logs: Callable[[], str] | None = None) -> Any:
    """Poll ``pred`` until it is truthy (returned); else fail naming ``what``, with the tail of ``logs()``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out ({timeout:.0f}s) waiting for {what}" + (f"\n{logs()[-4000:]}" if logs else ""))


def missing_binaries() -> dict[str, str]:
    """{binary: Debian package} for what is not installed (empty when all are)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS])
    return {b: pkg for b, pkg in BINARIES.items() if shutil.which(b, path=path) is None}


def _which(name: str) -> str:
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS])
    found = shutil.which(name, path=path)
    if found is None:
        raise SlurmClusterError(f"{name} not found: apt-get install {BINARIES.get(name, name)}")
    return found


def _free_ports(n: int) -> list[int]:
    """n distinct ports free on all addresses right now (bind to port 0, then release)."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
            port = s.getsockname()[1]
            if port not in ports:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


class SlurmCluster:
    """A Slurm cluster of ``n_nodes`` slurmd daemons on this machine (run as root)."""

    def __init__(
        self,
        base: str | os.PathLike[str],
        n_nodes: int = 3,
        cpus_per_node: int = 4,
        real_memory_mb: int = 4000,
        proctrack: str = "proctrack/cgroup",
        cred_expire_s: int = 5,  # Slurm's minimum: a requeued job may start again ~6 s later (10: ~11 s)
        grace_time_s: int = 0,
        name: str | None = None,
        extra_conf: str = "",
        shared: Sequence[str | os.PathLike[str]] | None = None,
    ) -> None:
        self.base = Path(base).resolve()
        self.nodes = [f"n{i}" for i in range(1, n_nodes + 1)]
        self.net = TestNet()
        self.ctl_addr = f"{self.net.subnet}.2"
        self.node_addr = {n: f"{self.net.subnet}.{10 + i}" for i, n in enumerate(self.nodes, 1)}
        # Default: base's parent, which is pytest's base temp dir for a tmp_path_factory.mktemp base.
        self.shared = node_shared_dirs([self.base, *([self.base.parent] if shared is None else shared)])
        self.cpus_per_node = cpus_per_node
        self.real_memory_mb = real_memory_mb
        self.proctrack = proctrack
        self.cred_expire_s = cred_expire_s
        self.grace_time_s = grace_time_s
        self.name = name or f"mhpc{secrets.token_hex(3)}"
        self.extra_conf = extra_conf
        # Job ids unique across clusters running at once on this machine: slurmd's cgroups are
        # /sys/fs/cgroup/<ctrl>/slurm_<node>/uid_<uid>/job_<id>, shared between clusters.
        self.first_job_id = 1000 + secrets.randbelow(50_000_000)
        self.etc = self.base / "etc"
        self.log_dir = self.base / "log"
        self.run_dir = self.base / "run"
        self.conf_path = self.etc / "slurm.conf"
        self.munge_socket = self.base / "munge" / "munge.socket"
        self.db_socket = self.run_dir / "mariadb.sock"
        self.env: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        self._daemons: list[Daemon] = []
        self._started = False

    # ---------------------------------------------------------------- public

    @property
    def env_overlay(self) -> dict[str, str]:
        """The variables a client process needs on top of its own environment."""
        return {"SLURM_CONF": str(self.conf_path)}

    def start(self, timeout: float = 60) -> SlurmCluster:
        if os.geteuid() != 0:
            raise SlurmClusterError("SlurmCluster runs slurmd/slurmctld and must run as root")
        missing = missing_binaries()
        if missing:
            pkgs = sorted(set(missing.values()))
            raise SlurmClusterError(f"missing {', '.join(sorted(missing))}: apt-get install --no-install-recommends {' '.join(pkgs)}")
        self._check_plugins()
        t0 = time.monotonic()
        for d in (self.etc, self.log_dir, self.run_dir, self.base / "munge", self.base / "state", self.base / "spool"):
            d.mkdir(parents=True, exist_ok=True)
        for n in self.nodes:
            (self.base / "spool" / n).mkdir(exist_ok=True)
            (self.run_dir / f"stage-{n}").mkdir(exist_ok=True)
        self.ports = dict(zip(["ctld", "dbd", *self.nodes], _free_ports(2 + len(self.nodes))))
        write_configs(self)
        self.env = {**os.environ, **self.env_overlay}
        self.env["PATH"] = os.pathsep.join([self.env.get("PATH", ""), "/usr/sbin", "/sbin"])
        deadline = time.monotonic() + timeout
        self._started = True
        atexit.register(self.stop)  # an interrupted session still stops its daemons
        try:
            self._step("network", self._start_network, deadline)
            self._step("munged", self._start_munge, deadline)
            self._step("mariadb", self._start_mariadb, deadline)
            self._step("slurmdbd", self._start_slurmdbd, deadline)
            self._step("slurmctld", self._start_slurmctld, deadline)
            self._step("slurmd", self._start_slurmds, deadline)
            self._step("idle", lambda d: self.wait_idle(timeout=max(1.0, d - time.monotonic())), deadline)
        except BaseException:
            self.stop()
            raise
        self.timings["start"] = time.monotonic() - t0
        return self

    def stop(self, timeout: float = 20) -> None:
        """Cancel every job and wait (up to ``timeout``) for them to end, then stop the daemons by
        pid: all slurmd at once (and whatever still runs in their namespaces: slurmstepd, job
        processes), then slurmctld, slurmdbd, mariadb, munged. Logs and state stay in ``base``."""
        if not self._started:
            return
        t0 = time.monotonic()
        ctld = self._daemon("slurmctld")
        if ctld is not None and ctld.alive():
            with contextlib.suppress(Exception):
                self.cancel_all(timeout)
        slurmds = [d for d in self._daemons if d.name.startswith("slurmd-")]
        terminate(slurmds, grace=5)
        for d in slurmds:
            self._kill_node_processes(d)
        for d in reversed(self._daemons):
            if d not in slurmds:
                terminate([d])
        self._daemons.clear()
        self.net.remove()
        self._started = False
        atexit.unregister(self.stop)
        self.timings["stop"] = time.monotonic() - t0

    def reset(self, timeout: float = 60) -> None:
        """Back to an empty, idle cluster for the next test: cancel every job and boot
        again any node a test killed."""
        assert self.cancel_all(timeout=timeout), f"jobs still listed {timeout:.0f} s after scancel"
        booted = [n for n in self.nodes if not self._slurmd(n).alive()]
        for n in booted:
            self.restart_node(n)
        self.wait_idle(timeout=timeout)
        if booted:
            self._wait_steps_launch(timeout)

    def _wait_steps_launch(self, timeout: float) -> None:
        """Idle in slurmctld's view is not yet launchable: after a node was booted again, a job's
        first step failed at once with "Task launch ... failed on node n2: Communication
        connection failure" (twice in CI, though a step sent from this host to the booted node
        had run). So the probe is that very path: a batch job on every node whose script
        launches a step on all of them, submitted until one completes."""
        end = time.monotonic() + timeout
        failures: list[str] = []
        while True:
            job = self.sbatch(f"-N{len(self.nodes)}", "--wrap", "srun true")
            info = self.wait_job(job, ("COMPLETED", "FAILED", "CANCELLED", "NODE_FAIL", "TIMEOUT"), timeout=timeout)
            if info.get("JobState") == "COMPLETED":
                if failures:
                    print(f"test Slurm cluster: steps launch again after {len(failures)} failed probe(s): {failures}")
                return
            failures.append(f"{job}:{info.get('JobState')}")
            if time.monotonic() > end:
                raise SlurmClusterError(
                    f"job steps fail to launch {timeout:.0f} s after booting nodes again ({failures}):\n"
                    + self._tails("slurmctld", *[f"slurmd-{n}" for n in self.nodes])
                )
            time.sleep(1.0)

    def cancel_all(self, timeout: float = 20) -> bool:
        """scancel every job and wait until squeue is empty; False if some are still listed."""
        ids = self.run(["squeue", "-h", "-o", "%A"], timeout=10).stdout.split()
        if not ids:
            return True
        self.run(["scancel", *ids], check=False, timeout=10)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self.run(["squeue", "-h", "-o", "%A"], timeout=10).stdout.split():
                return True
            time.sleep(0.25)
        return False

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run(self, cmd: str | Sequence[str], check: bool = True, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess:
        """Run a (Slurm client) command with the cluster's environment; text output captured."""
        args = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        res = subprocess.run(args, env=kw.pop("env", self.env), capture_output=True, text=True, timeout=timeout, check=False, **kw)
        if check and res.returncode != 0:
            raise SlurmClusterError(f"{shlex.join(args)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
        return res

    @contextlib.contextmanager
    def activate(self) -> Iterator[SlurmCluster]:
        """Set SLURM_CONF (and the sbin dirs on PATH) in os.environ for the block (for submitit)."""
        saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "PATH")}
        os.environ["SLURM_CONF"] = str(self.conf_path)
        os.environ["PATH"] = self.env["PATH"]
        try:
            yield self
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def sbatch(self, *args: str, cwd: str | os.PathLike[str] | None = None) -> str:
        """Submit and return the job id."""
        out = self.run(["sbatch", "--parsable", *args], cwd=cwd or self.base).stdout.strip()
        return out.split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict ({} when slurmctld no longer knows the job)."""
        res = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False)
        if res.returncode != 0:
            return {}
        info: dict[str, str] = {}
        for tok in res.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                info.setdefault(k, v)
        return info

    def state(self, job_id: str) -> str:
        return self.job(job_id).get("JobState", "")

    def wait_job(self, job_id: str, states: Iterable[str], timeout: float = 60, poll: float = 0.2) -> dict[str, str]:
        """Wait until the job's state (scontrol) is one of ``states``; returns its info."""
        want = set(states)
        end = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < end:
            info = self.job(job_id)
            if info.get("JobState") in want:
                return info
            time.sleep(poll)
        raise SlurmClusterError(f"job {job_id} not in {sorted(want)} after {timeout}s: {info.get('JobState')}\n{info}")

    def sacct_state(self, job_id: str) -> str:
        """The allocation's state as recorded by slurmdbd ('' when not (yet) recorded)."""
        out = self.run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State"], check=False).stdout.split()
        return out[0] if out else ""

    def wait_idle(self, timeout: float = 60) -> None:
        """Wait until every node is idle (no jobs, registered)."""
        end = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < end:
            self._check_daemons()
            res = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False, timeout=15)
            if res.returncode == 0:
                states = dict(line.split() for line in res.stdout.splitlines() if line.strip())
                if all(states.get(n) == "idle" for n in self.nodes):
                    return
            time.sleep(0.2)
        raise SlurmClusterError(f"nodes not idle after {timeout}s: {states}\n" + self._tails("slurmctld", *[f"slurmd-{n}" for n in self.nodes]))

    def logs(self) -> str:
        return "\n".join(d.tails() for d in self._daemons)

    # nodes as hosts

    def node_exec(self, node: str, argv: Sequence[str], timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``argv`` on ``node``: in its network, UTS, mount and PID namespaces."""
        d = self._slurmd(node)
        assert d.init_pid is not None, node
        ns = ["--mount", "--uts", "--net", "--pid"]
        return self.run(["nsenter", f"--target={d.init_pid}", *ns, "--", *argv], check=check, timeout=timeout)

    def node_pids(self, node: str) -> list[int]:
        """Host pids of every process on ``node`` (its slurmd, job steps, whatever they started)."""
        d = self._slurmd(node)
        return [] if d.init_pid is None else pids_in_pidns(d.init_pid)

    def kill_node(self, node: str, reason: str = "killed by test") -> float:
        """Crash ``node``: unplug its link (packets to it vanish, as to a dead host, instead of
        being refused) and SIGKILL its PID 1, so the kernel kills every process on it at once
        (slurmd, slurmstepd, job steps, Ray); then tell slurmctld it is down, as a health check
        would (Slurm's own detection waits SlurmdTimeout). Returns the kill's time.time()."""
        d = self._slurmd(node)
        assert d.init_pid is not None and d.alive(), f"{node} is not running"
        self.net.set_link(node, up=False)
        os.kill(d.init_pid, signal.SIGKILL)
        t = time.time()
        with contextlib.suppress(subprocess.TimeoutExpired):
            d.proc.wait(10)
        self.run(["scontrol", "update", f"nodename={node}", "state=down", f"reason={reason}"], check=False)
        return t

    def restart_node(self, node: str, timeout: float = 60) -> None:
        """Boot a killed ``node`` again (a fresh slurmd, /tmp and /dev/shm) and return it to service."""
        d = self._slurmd(node)
        self._kill_node_processes(d)
        self._daemons.remove(d)
        self.net.set_link(node, up=True)
        deadline = time.monotonic() + timeout
        self._start_slurmd(node)
        self._wait_slurmd(node, deadline)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.run(["scontrol", "update", f"nodename={node}", "state=resume"], check=False)
            states = self.run(["sinfo", "-h", "-n", node, "-o", "%t"], check=False).stdout.split()
            if states and states[0] == "idle":
                return
            time.sleep(0.5)
        raise SlurmClusterError(f"{node} not idle {timeout:.0f}s after its restart:\n{self._tails('slurmctld', f'slurmd-{node}')}")

    # -------------------------------------------------------------- internal

    def _check_plugins(self) -> None:
        for d in PLUGIN_DIRS:
            if Path(d, "select_cons_tres.so").exists():
                if not Path(d, "accounting_storage_mysql.so").exists():
                    raise SlurmClusterError("accounting_storage_mysql.so missing: apt-get install slurm-wlm-mysql-plugin")
                return

    def _step(self, name: str, fn: Any, deadline: float) -> None:
        t = time.monotonic()
        fn(deadline)
        self.timings[f"start.{name}"] = time.monotonic() - t

    def _daemon(self, name: str) -> Daemon | None:
        return next((d for d in self._daemons if d.name == name), None)

    def _slurmd(self, node: str) -> Daemon:
        d = self._daemon(f"slurmd-{node}")
        if d is None:
            raise SlurmClusterError(f"no node {node} (nodes: {self.nodes})")
        return d

    def _tails(self, *names: str) -> str:
        return "\n".join(d.tails() for d in self._daemons if d.name in names)

    def _check_daemons(self) -> None:
        for d in self._daemons:
            if not d.alive():
                raise SlurmClusterError(f"{d.name} (pid {d.pid}) exited ({d.proc.poll()}):\n{d.tails()}")

    def _spawn(self, name: str, argv: list[str], extra_logs: Sequence[Path] = (), env: dict | None = None) -> Daemon:
        out = self.log_dir / f"{name}.out"
        with open(out, "ab") as fh:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                env=env or {**os.environ, **self.env_overlay}, cwd=self.base, start_new_session=True,
            )  # fmt: skip
        d = Daemon(name, proc, [out, *extra_logs])
        self._daemons.append(d)
        return d

    def _wait(self, d: Daemon, what: str, ready: Any, deadline: float) -> None:
        while time.monotonic() < deadline:
            if not d.alive():
                raise SlurmClusterError(f"{d.name} exited ({d.proc.poll()}) before {what}:\n{d.tails()}")
            with contextlib.suppress(Exception):
                if ready():
                    return
            time.sleep(0.1)
        raise SlurmClusterError(f"timed out waiting for {what}:\n{d.tails()}")

    @staticmethod
    def _port_open(port: int, host: str = "127.0.0.1") -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex((host, port)) == 0

    def _kill_node_processes(self, d: Daemon) -> None:
        """SIGKILL a node's PID 1 (the kernel then kills the rest) and whatever sits in its mount namespace."""
        if d.init_pid is not None and alive(d.init_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(d.init_pid, signal.SIGKILL)
        if d.mnt_ns is not None:
            for pid in pids_in_mnt_ns(d.mnt_ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            d.proc.wait(10)

    # daemons

    def _start_network(self, deadline: float) -> None:
        self.net.create()
        self.net.add_host("ctl", 2)
        for i, n in enumerate(self.nodes, 1):
            self.net.add_host(n, 10 + i)

    def _in_ctl(self, argv: list[str]) -> list[str]:
        """argv run on the ``ctl`` host: its network namespace, hostname ``ctl`` and hosts file."""
        script = 'hostname ctl && mount --bind "$1" /etc/hosts && shift && exec "$@"'
        return [_which("nsenter"), f"--net={self.net.ns_path('ctl')}", "--", _which("unshare"), "--uts", "--mount",
                "--propagation", "private", "--", "/bin/sh", "-c", script, "sh", str(self.etc / "hosts"), *argv]  # fmt: skip

    def _start_munge(self, deadline: float) -> None:
        key = self.base / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        (self.base / "munge").chmod(0o755)
        log = self.log_dir / "munged.log"
        # As root with --force: no munge-owned directories needed; the socket is private to this cluster.
        d = self._spawn("munged", self._in_ctl([
            _which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
            f"--key-file={key}", f"--log-file={log}", f"--pid-file={self.run_dir / 'munged.pid'}",
            f"--seed-file={self.base / 'munge' / 'munged.seed'}",
        ]), [log])  # fmt: skip
        munge = _which("munge")

        def ready() -> bool:
            res = subprocess.run([munge, "-S", str(self.munge_socket), "-n"], capture_output=True, timeout=5, check=False)
            return res.returncode == 0

        self._wait(d, "munged's socket", ready, deadline)

    def _start_mariadb(self, deadline: float) -> None:
        datadir = self.base / "mariadb"
        common = ["--no-defaults", "--user=root", f"--datadir={datadir}", "--innodb-log-file-size=16M"]
        if not (datadir / "mysql").exists():
            out = self.log_dir / "mariadb-install-db.log"
            with open(out, "wb") as fh:
                rc = subprocess.run(
                    [_which("mariadb-install-db"), *common, "--auth-root-authentication-method=socket",
                     "--skip-test-db"], stdout=fh, stderr=subprocess.STDOUT, cwd=self.base, timeout=120, check=False,
                ).returncode  # fmt: skip
            if rc != 0:
                raise SlurmClusterError(f"mariadb-install-db exited {rc}:\n{tail(out)}")
        err = self.log_dir / "mariadb.log"
        d = self._spawn("mariadb", self._in_ctl([
            _which("mariadbd"), *common, "--skip-networking", f"--socket={self.db_socket}",
            f"--pid-file={self.run_dir / 'mariadb.pid'}", f"--log-error={err}",
            "--innodb-buffer-pool-size=128M", "--innodb-lock-wait-timeout=900", "--skip-log-bin",
        ]), [err])  # fmt: skip
        self._wait(d, "mariadb ready", lambda: "ready for connections" in err.read_text(errors="replace"), deadline)

    def _start_slurmdbd(self, deadline: float) -> None:
        env = {**os.environ, **self.env_overlay, "MYSQL_UNIX_PORT": str(self.db_socket)}
        d = self._spawn("slurmdbd", self._in_ctl([_which("slurmdbd"), "-D"]), [self.log_dir / "slurmdbd.log"], env=env)
        self._wait(d, "slurmdbd's port", lambda: self._port_open(self.ports["dbd"], self.ctl_addr), deadline)

    def _start_slurmctld(self, deadline: float) -> None:
        d = self._spawn("slurmctld", self._in_ctl([_which("slurmctld"), "-D", "-i", "-f", str(self.conf_path)]),
                        [self.log_dir / "slurmctld.log"])  # fmt: skip
        self._wait(d, "slurmctld answering", lambda: self.run(["scontrol", "ping"], check=False, timeout=10)
                   .stdout.count("UP") >= 1, deadline)  # fmt: skip

    def _start_slurmds(self, deadline: float) -> None:
        for n in self.nodes:
            self._start_slurmd(n)
        for n in self.nodes:
            self._wait_slurmd(n, deadline)

    def _start_slurmd(self, n: str) -> None:
        boot_id = self.run_dir / f"boot_id-{n}"  # a new one per boot, as a rebooted host gets
        boot_id.write_text(f"{uuid.uuid4()}\n")
        argv = [
            _which("nsenter"), f"--net={self.net.ns_path(n)}", "--",
            _which("unshare"), "--uts", "--ipc", "--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc", "--",
            "/bin/sh", "-c", NODE_SETUP, "sh", n, str(self.etc / "hosts"), str(boot_id), str(self.run_dir / f"stage-{n}"), *self.shared, "--",
            sys.executable, "-c", NODE_INIT, _which("slurmd"), "-D", "-N", n, "-f", str(self.conf_path),
        ]  # fmt: skip
        self._spawn(f"slurmd-{n}", argv, [self.log_dir / f"slurmd-{n}.log"])

    def _wait_slurmd(self, n: str, deadline: float) -> None:
        d = self._slurmd(n)

        def up() -> bool:  # unshare's child is the node's PID 1 (the init); its child is slurmd
            kids = Path(f"/proc/{d.pid}/task/{d.pid}/children").read_text().split()
            if not kids:
                return False
            init = int(kids[0])
            slurmds = Path(f"/proc/{init}/task/{init}/children").read_text().split()
            if not slurmds or not Path(f"/proc/{slurmds[0]}/cmdline").read_bytes().split(b"\0")[0].endswith(b"slurmd"):
                return False
            d.init_pid, d.mnt_ns = init, mnt_ns(init)
            return True

        self._wait(d, f"slurmd {n} in its namespaces", up, deadline)
