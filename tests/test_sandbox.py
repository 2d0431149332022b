"""Sandbox isolation and limits, against the real runtimes.

Every test runs for bubblewrap and, when ``apptainer`` is installed (and a sandbox
image is given in MATRIX_HPC_SANDBOX_IMAGE), for Apptainer too. Payloads are real:
a socket to the outside, writes to system paths, a memory hog, a busy loop, a
fork bomb. Each checks what a user relies on: the result says what happened,
the host is untouched, nothing is left running.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from matrix_hpc.services.sandbox import RuntimeNotInstalled, Sandbox, SandboxConfigError, SandboxLimits, pool_config
from matrix_hpc.services.sandbox.apptainer import ApptainerOptions, ApptainerRuntime
from matrix_hpc.services.sandbox.base import SandboxRuntime
from matrix_hpc.services.sandbox.bubblewrap import BubblewrapRuntime, BubblewrapSandbox

T = TypeVar("T")
IMAGE = os.environ.get("MATRIX_HPC_SANDBOX_IMAGE", str(Path(__file__).resolve().parent.parent / "containers" / "sandbox.sif"))


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


def make_runtime(name: str) -> SandboxRuntime:
    if name == "bubblewrap":
        if shutil.which("bwrap") is None:
            pytest.fail("bubblewrap is not installed: `make test` installs it (apt-get install bubblewrap)")
        return BubblewrapRuntime()
    if shutil.which("apptainer") is None:
        pytest.skip("apptainer is not installed (Debian 12 has no package; containers/README.md says how to install it); the same tests run when it is")
    if not Path(IMAGE).exists():
        pytest.skip(f"apptainer is installed but no sandbox image at {IMAGE}: build containers/sandbox.def or set MATRIX_HPC_SANDBOX_IMAGE")
    return ApptainerRuntime(ApptainerOptions(image=IMAGE))


@pytest.fixture(params=["bubblewrap", "apptainer"])
def runtime(request: pytest.FixtureRequest) -> SandboxRuntime:
    rt = make_runtime(request.param)
    rt.check()
    return rt


@pytest.fixture
def sandbox_root() -> Iterator[Path]:
    # Under /tmp with a world-executable path: as root, sandboxes run as nobody.
    root = Path(tempfile.mkdtemp(prefix="mhs-test-", dir="/tmp"))
    root.chmod(0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def new_sandbox(runtime: SandboxRuntime, sandbox_root: Path) -> Iterator[Callable[[], Sandbox]]:
    made: list[Sandbox] = []

    def make() -> Sandbox:
        sb = runtime.create(len(made), sandbox_root / f"s{len(made)}", 0)
        run(sb.start())
        made.append(sb)
        return sb

    yield make
    for sb in made:
        run(sb.stop())


def processes_with(marker: str, program: str = "") -> list[int]:
    """Pids of live (not zombie) processes whose command line contains ``marker`` (and starts with ``program``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if marker.encode() in cmdline and cmdline.startswith(program.encode()) and " Z " not in (entry / "stat").read_text():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def wait_gone(marker: str, timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not processes_with(marker):
            return []
        time.sleep(0.1)
    return processes_with(marker)


LIMITS = SandboxLimits(wall_s=10, cpu_s=5, memory_mb=256, fsize_mb=1, tmpfs_mb=8, nproc=32, output_kb=64)


def test_commands_run_in_sandbox_dir_and_files_persist(new_sandbox: Callable[[], Sandbox]) -> None:
    sb = new_sandbox()
    sb.write_file("in/data.txt", b"hello")
    res = run(sb.exec("pwd; cat in/data.txt; echo out > result.txt", LIMITS))
    assert res.ok and res.stdout == "/sandbox\nhello", res
    assert run(sb.exec(["python3", "-c", "print(open('/sandbox/result.txt').read().strip())"], LIMITS)).stdout == "out\n"
    assert sb.read_file("result.txt") == b"out\n"
    with pytest.raises(ValueError, match="outside"):
        sb.read_file("/etc/passwd")
    with pytest.raises(ValueError):
        sb.write_file("../escape", b"x")
    # What a payload may plant under a name the host reads back: a symlink out, a FIFO.
    assert run(sb.exec("ln -s /etc/shadow link; mkdir d; ln -s /etc dirlink; mkfifo fifo", LIMITS)).ok
    for planted in ("link", "dirlink/passwd", "fifo"):
        with pytest.raises(OSError if planted == "link" else ValueError):
            sb.read_file(planted)
    sb.wipe()
    assert run(sb.exec("ls -A", LIMITS)).stdout == ""


def test_network_is_unreachable(new_sandbox: Callable[[], Sandbox]) -> None:
    # A server on the host's loopback: a sandbox with its own network namespace cannot reach it.
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        script = (
            "import socket\n"
            "print(sorted(n for _, n in socket.if_nameindex()))\n"
            f"for addr in [('1.1.1.1', 80), ('127.0.0.1', {port})]:\n"
            "    try:\n"
            "        socket.create_connection(addr, timeout=3); print('connected', addr)\n"
            "    except OSError as e:\n"
            "        print('failed', addr[0], e.errno)\n"
        )
        res = run(new_sandbox().exec(["python3", "-c", script], LIMITS))
    assert res.exit_code == 0, res
    lines = res.stdout.splitlines()
    assert lines[0] == "['lo']", res.stdout
    assert lines[1].startswith("failed 1.1.1.1") and lines[2].startswith("failed 127.0.0.1"), res.stdout
    assert "connected" not in res.stdout


def test_writes_outside_the_sandbox_fail(new_sandbox: Callable[[], Sandbox], sandbox_root: Path) -> None:
    victim, other = new_sandbox(), new_sandbox()
    host_file = sandbox_root / "host-secret.txt"
    host_file.write_text("untouched")
    host_file.chmod(0o666)  # even a world-writable host file is out of reach
    script = " ; ".join(
        f"(echo x > {p} 2>/dev/null && echo WROTE {p} || echo refused {p})"
        for p in ["/usr/evil", "/etc/passwd", "/evil", "/bin/evil", str(host_file), f"{other.workdir}/evil", "/sandbox/ok", "/tmp/ok"]
    )
    res = run(victim.exec(script, LIMITS))
    assert res.exit_code == 0, res
    wrote = [line.split()[1] for line in res.stdout.splitlines() if line.startswith("WROTE")]
    assert wrote == ["/sandbox/ok", "/tmp/ok"], res.stdout
    assert host_file.read_text() == "untouched" and not any(other.workdir.iterdir())
    assert not Path("/usr/evil").exists() and not Path("/evil").exists()
    # /tmp is private to one exec and size-limited.
    assert run(victim.exec("ls /tmp", LIMITS)).stdout == ""
    full = run(victim.exec("head -c 20000000 /dev/zero > /tmp/big", SandboxLimits(wall_s=10, tmpfs_mb=2, fsize_mb=64)))
    assert full.exit_code != 0 and "No space left" in full.stderr, full


def test_memory_limit_kills_and_reports(new_sandbox: Callable[[], Sandbox]) -> None:
    res = run(new_sandbox().exec(["python3", "-c", "b = bytearray(1024 * 2**20); print('allocated')"], LIMITS))
    assert res.exit_code != 0 and res.killed_reason == "memory", res
    assert "allocated" not in res.stdout


def test_cpu_limit_kills_and_reports(new_sandbox: Callable[[], Sandbox]) -> None:
    res = run(new_sandbox().exec(["python3", "-c", "while True: pass"], SandboxLimits(wall_s=20, cpu_s=1)))
    assert res.killed_reason == "cpu" and not res.timed_out, res
    assert res.duration_s < 10


def test_wall_clock_limit_kills_everything_and_reports(new_sandbox: Callable[[], Sandbox]) -> None:
    marker = f"mhs-{uuid.uuid4().hex[:8]}"
    # A background child that would outlive its parent, and a sleeping foreground.
    sleeper = f"python3 -c 'import time; time.sleep(300)' {marker}"
    res = run(new_sandbox().exec(f"{sleeper} & {sleeper}", SandboxLimits(wall_s=1)))
    assert res.timed_out and res.killed_reason == "wall", res
    assert res.duration_s < 4
    assert wait_gone(marker) == [], "processes left behind after a wall-clock kill"


def test_file_size_and_output_limits(new_sandbox: Callable[[], Sandbox]) -> None:
    sb = new_sandbox()
    big = run(sb.exec("head -c 5000000 /dev/zero > big.bin", LIMITS))
    assert big.killed_reason == "fsize", big
    assert (sb.workdir / "big.bin").stat().st_size <= 1024 * 1024
    loud = run(sb.exec("yes", LIMITS))
    assert loud.killed_reason == "output" and len(loud.stdout) == 64 * 1024, loud.killed_reason


def test_fork_bomb_is_contained(new_sandbox: Callable[[], Sandbox]) -> None:
    bomb_box, neighbour = new_sandbox(), new_sandbox()
    marker = f"mhs-bomb-{uuid.uuid4().hex[:8]}"
    bomb = f"import os, time  # {marker}\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.01)\n"

    async def scenario() -> tuple[Any, Any, int]:
        bombing = asyncio.ensure_future(bomb_box.exec(["python3", "-c", bomb], SandboxLimits(wall_s=4, nproc=32)))
        await asyncio.sleep(1.5)
        running = len(processes_with(marker, program="python3"))  # not the bwrap/timeout wrappers
        # Meanwhile another sandbox still forks freely: the limit is per sandbox, not per user.
        ok = await neighbour.exec("for i in $(seq 20); do sleep 0.2 & done; wait; echo fine", LIMITS)
        return await bombing, ok, running

    started = time.monotonic()
    res, ok, running = run(scenario())
    assert 8 <= running < 32, f"{running} bomb processes: the bomb did not run, or ran past nproc=32"
    assert res.killed_reason in ("wall", "signal:9") and res.duration_s < 7, res
    assert time.monotonic() - started < 10
    assert ok.ok and ok.stdout == "fine\n", ok
    assert wait_gone(marker) == [], "fork bomb processes left behind"
    assert run(bomb_box.exec("echo alive", LIMITS)).stdout == "alive\n"


def test_missing_runtime_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeNotInstalled, match=r"needs `bwrap`.*apt-get install bubblewrap"):
        BubblewrapRuntime().check()
    with pytest.raises(RuntimeNotInstalled, match=r"needs `apptainer`.*github.com/apptainer/apptainer/releases"):
        ApptainerRuntime(ApptainerOptions(image="x.sif")).check()


def test_pool_config_errors_name_the_key() -> None:
    with pytest.raises(SandboxConfigError, match=r"sandbox.limits.wall_s: expected float, got 'soon'"):
        pool_config({"limits": {"wall_s": "soon"}})
    with pytest.raises(SandboxConfigError, match=r"unknown key sandbox.sizes"):
        pool_config({"sizes": 3})
    with pytest.raises(SandboxConfigError, match=r"sandbox.runtime: expected one of bubblewrap, apptainer, got 'docker'"):
        pool_config({"runtime": "docker"})
    with pytest.raises(SandboxConfigError, match=r"sandbox.limits: sandbox limit memory_mb must be > 0"):
        pool_config({"limits": {"memory_mb": 0}})
    cfg = pool_config({"size": 2, "limits": {"wall_s": 3}, "bubblewrap": {"ro_binds": ["/opt:/opt"]}})
    assert cfg.size == 2 and cfg.limits.wall_s == 3.0 and cfg.bubblewrap.ro_binds == ["/opt:/opt"]


def test_reset_kills_a_command_namespace_that_outlived_it(sandbox_root: Path) -> None:
    # Bubblewrap's ties make this never happen; the pool checks anyway. Stand in for a
    # surviving command: a real process that is init of its own PID namespace.
    if os.geteuid() != 0 or shutil.which("bwrap") is None:
        pytest.skip("needs root (unshare --pid) and bubblewrap")
    sb = BubblewrapRuntime().create(0, sandbox_root / "s0", 0)
    run(sb.start())
    marker = f"1000.{uuid.uuid4().int % 10**6:06d}"
    outer = subprocess.Popen(["unshare", "--pid", "--fork", "sleep", marker], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not processes_with(marker, "sleep") and time.monotonic() < deadline:
            time.sleep(0.05)
        (init,) = processes_with(marker, "sleep")
        ns = int(os.readlink(f"/proc/{init}/ns/pid").removeprefix("pid:[").removesuffix("]"))
        assert isinstance(sb, BubblewrapSandbox)
        sb.execs.append((init, ns))
        assert run(sb.reset()) is None  # killed, checked gone, sandbox reusable
        assert processes_with(marker, "sleep") == [] and sb.execs == []
    finally:
        outer.kill()
        outer.wait()
        run(sb.stop())
