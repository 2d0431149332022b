"""Shared helpers: small datasets, job configs, and `matrix-hpc run` as a real subprocess.

Every process a test starts runs in its own session and is stopped by its
process-group id (never a broad pkill), Ray's helper processes included.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = REPO / "workflows" / "collab_reasoning" / "data" / "questions.jsonl"
BIN = Path(sys.executable).parent


def questions(n: int) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]
    return rows[:n]


def write_jsonl(path: Path, rows: list[dict[str, Any] | str]) -> Path:
    with open(path, "w") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def job_config(tmp: Path, dataset: Path, **overrides: Any) -> Path:
    """A collab-reasoning job sized for tests: short turns, quick commits."""
    cfg = yaml.safe_load((REPO / "workflows" / "collab_reasoning" / "config.yaml").read_text())
    cfg["dataset"]["path"] = str(dataset)
    cfg["dataset"]["limit"] = None
    cfg["output"]["path"] = str(tmp / "out")
    cfg["output"]["flush_interval_s"] = 0.2
    cfg["llm"]["max_tokens"] = 24
    cfg["llm"]["embedded"]["n_parallel"] = 8
    cfg["workflow"]["params"]["max_turns"] = 2
    cfg["run"]["max_in_flight"] = 16
    cfg["run"]["progress"] = "log"
    cfg["run"]["progress_interval_s"] = 1.0
    return write_config(tmp, cfg, overrides)


def write_config(tmp: Path, cfg: dict[str, Any], overrides: dict[str, Any]) -> Path:
    """Apply dotted ``key: value`` overrides to ``cfg`` and write it as ``tmp/job.yaml``."""
    for key, value in overrides.items():
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@contextlib.contextmanager
def tmpfs(tmp: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` under ``tmp`` (a real ENOSPC when full); root only."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@contextlib.contextmanager
def private_ray(namespace: str, num_cpus: int = 2) -> Iterator[Any]:
    """A private local Ray for a test that drives actors from this process, started as a run
    starts its own (``start_ray``: a fresh token, loopback only, the lean head), stopped after."""
    from matrix_hpc.cluster import start_ray
    from matrix_hpc.config import ClusterConfig

    cluster = start_ray(ClusterConfig(num_cpus=num_cpus), namespace)
    try:
        yield cluster
    finally:
        cluster.shutdown()


def fill(disk: Path) -> Path:
    """Take every free byte of ``disk``; returns the filler file (delete it with
    ``unlink(missing_ok=True)`` to free the space). A disk already full has no room even for
    the file's entry: then there is no filler, and the disk stays as full as it was."""
    filler = disk / "filler"
    try:
        # Unbuffered: a buffered file's close() flushes what the full disk refused and raises
        # ENOSPC again (a CI run failed there).
        fh = open(filler, "wb", buffering=0)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        print(f"fill: {disk} is full already ({shutil.disk_usage(disk).used >> 20} MiB used)")
        return filler
    with fh:
        block = b"\0" * 65536
        try:
            while fh.write(block):
                pass
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return filler


class Run:
    """``matrix-hpc run`` (or ``serve``) in its own session, so the test can kill it and everything it started."""

    def __init__(self, config: Path, *overrides: str, log: Path, command: str = "run") -> None:
        self.log_path = log
        self._log = open(log, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [str(BIN / "matrix-hpc"), command, str(config), *overrides],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=REPO,
        )  # fmt: skip

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.cleanup()

    def kill(self) -> None:
        """SIGKILL the driver only (what a crash or an OOM kill does)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def cleanup(self) -> None:
        """Stop whatever the run left in its process group (Ray's agents after a SIGKILL)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def committed_rows(out: Path) -> int:
    try:
        return json.loads((out / "part-000" / "commit.json").read_text())["rows"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def wait_for(predicate: Any, timeout: float, what: str, run: Run | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if run is not None and run.proc.poll() is not None:
            raise AssertionError(f"run exited ({run.proc.returncode}) before {what}:\n{run.output[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}" + (f":\n{run.output[-3000:]}" if run else ""))


def ok_rows(ids: list[str]) -> list[Any]:
    """Store rows of finished tasks (``RecordRow``), one per id, for tests that feed a writer or the sink."""
    from matrix_hpc.store import RecordRow

    return [RecordRow(i, "ok", "", json.dumps({"id": i, "status": "ok"}), 1.0, 1, 2) for i in ids]


def store_records(out: Path) -> list[dict[str, Any]]:
    from matrix_hpc.store import StoreReader

    return list(StoreReader(out).iter_records())


@pytest.fixture
def run_factory(tmp_path: Path) -> Iterator[Any]:
    runs: list[Run] = []

    def start(config: Path, *overrides: str, command: str = "run") -> Run:
        run = Run(config, *overrides, log=tmp_path / f"run{len(runs)}.log", command=command)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.cleanup()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The namespaced 3-node test Slurm cluster (tests/slurm_cluster.py), started once for
    every Slurm test module (a test module may define its own). GraceTime 30 s: a
    preempted job gets USR2 and this long to save before TERM/KILL."""
    from .slurm_cluster import SlurmCluster

    c = SlurmCluster(tmp_path_factory.mktemp("slurm"), grace_time_s=30, shared=[tmp_path_factory.getbasetemp()])
    c.start()
    try:
        yield c
    finally:
        c.stop()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The Slurm tests' measured times (kill -> tasks flowing again, interruption -> next
    life, ...) at the end of the run, where ``make test``'s output keeps them."""
    mod = sys.modules.get("tests.slurm_cluster")
    if mod is None or not mod.TIMES:
        return
    terminalreporter.write_sep("-", "slurm timings (s, or counts)")
    for what, vals in mod.TIMES.items():
        terminalreporter.write_line(f"{what}: {', '.join(f'{v:.1f}' for v in vals)}")


HEAVY_FILES = re.compile(r"tests/(test_slurm_\w+|test_vllm_server|test_multi_model_vllm)\.py::")
"""The files of the ``slurm`` and ``vllm`` tests (``test_heavy_tests_are_named_by_file`` keeps it true)."""


def is_heavy(nodeid: str) -> bool:
    """A Slurm or vLLM test, by its node id (the xdist controller sees ids, not marks)."""
    return bool(HEAVY_FILES.match(nodeid)) or (nodeid.startswith("tests/test_benchmarks_readme.py::") and "gpu_vllm" in nodeid)


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """With pytest-xdist (``make test``: ``-n 2``), every Slurm and vLLM test goes to one
    worker, in file order: one test Slurm cluster at a time, and never two vLLM start-ups at
    once; every other test is scheduled alone, as ``--dist load`` does. (xdist's own
    ``loadgroup`` cannot do it under pytest 9: the group it appends to a node id is dropped,
    and the groups were split, two Slurm tests sharing the test cluster at once.)"""
    from xdist.scheduler import LoadScopeScheduling

    class HeavyOnOneWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "heavy" if is_heavy(nodeid) else nodeid

    return HeavyOnOneWorker(config, log)


# ------------------------------------------------------------------ a clean exit

_SESSION: list[pytest.Session] = []
# Native threads the interpreter does not own, by their kernel names (15 characters):
# Ray's core worker keeps its gRPC threads after ray.shutdown() (gcs_client_io_service,
# event_engine, grpc_global_timer, ...) and nothing in Python can stop them.
_FOREIGN_THREADS = ("gcs_client_io_s", "event_engine", "grpc_global_tim", "timer_manager", "resolver-execut",
                    "default-executo", "worker.io", "client.poll", "server.poll")  # fmt: skip


def native_threads() -> list[str]:
    names = []
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            names.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
    return names


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Stop what in-process tests may have left running: an initialized Ray (a failed test's
    fixture may not have shut it down) and zarr's I/O thread with its event loop."""
    _SESSION.append(session)
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    if "zarr" in sys.modules:
        with contextlib.suppress(Exception):
            from zarr.core.sync import cleanup_resources

            cleanup_resources()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Exit without the interpreter's finalization when native threads that Python cannot stop
    are still running (Ray's gRPC threads after any in-process ``ray.init``): at exit they ran
    on into the C++ static destructors of ``_raylet`` and the process died with SIGSEGV after
    printing its summary (``make: *** [test] Segmentation fault``), failing CI however many
    tests passed. Everything pytest writes is written by now; the exit status is kept."""
    if hasattr(config, "workerinput") or not _SESSION:  # an xdist worker: execnet still has to talk
        return
    left = [n for n in native_threads() if n.startswith(_FOREIGN_THREADS)]
    if left:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(_SESSION[-1].exitstatus))


def actor_pids(run: Run, cls: str) -> list[int]:
    """Pids of the run's Ray actors of class ``cls`` (Ray titles them ``ray::Class...``)."""
    import psutil

    try:
        procs = psutil.Process(run.proc.pid).children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for p in procs:
        try:
            if any(c.startswith(f"ray::{cls}") for c in p.cmdline()):
                out.append(p.pid)
        except psutil.Error:
            continue
    return sorted(out)
