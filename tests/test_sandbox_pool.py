"""The sandbox pool as a real Ray actor over real bubblewrap (and Apptainer when installed).

What a user of the pool relies on: many concurrent commands succeed through a few
sandboxes; a caller waits (no busy loop) up to its limit and then gets a clear
error; sandboxes are wiped between leases and replaced after ``max_uses`` or a
failure; a lease whose holder actor is SIGKILLed comes back to the pool.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from matrix_hpc.services.sandbox import (
    LeaseNotFound,
    PoolStats,
    RuntimeNotInstalled,
    SandboxLimits,
    SandboxPool,
    SandboxSession,
    SandboxUnavailable,
    get_or_create_pool,
)

from .conftest import REPO, private_ray
from .test_sandbox import IMAGE, processes_with


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    with private_ray("sandbox-tests"):  # as a run starts its Ray: token auth, loopback, lean head
        yield


@pytest.fixture(scope="module")
def root_dir() -> Iterator[str]:
    root = tempfile.mkdtemp(prefix="mhs-pool-test-", dir="/tmp")
    os.chmod(root, 0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["bubblewrap", "apptainer"])
def runtime_cfg(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "apptainer":
        if shutil.which("apptainer") is None:
            pytest.skip("apptainer is not installed (Debian 12 has no package; containers/README.md says how to install it); the same tests run when it is")
        if not Path(IMAGE).exists():
            pytest.skip(f"apptainer is installed but no sandbox image at {IMAGE}: build containers/sandbox.def or set MATRIX_HPC_SANDBOX_IMAGE")
        return {"runtime": "apptainer", "apptainer": {"image": IMAGE}}
    return {"runtime": "bubblewrap"}


@pytest.fixture
def make_pool(ray_cluster: None, root_dir: str, runtime_cfg: dict[str, Any]) -> Iterator[Any]:
    pools: list[Any] = []

    def make(**settings: Any) -> Any:
        cfg = {**runtime_cfg, "root_dir": root_dir, "liveness_interval_s": 0.5, "idle_exit_s": None, **settings}
        pool = SandboxPool.remote(cfg, f"test-pool-{len(pools)}")
        pools.append(pool)
        ray.get(pool.ready.remote())
        return pool

    yield make
    for pool in pools:
        ray.get(pool.shutdown.remote())
        ray.kill(pool)


def stats(pool: Any) -> PoolStats:
    result: PoolStats = ray.get(pool.stats.remote())
    return result


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_200_concurrent_executions_through_one_pool(make_pool: Any) -> None:
    pool = make_pool(size=8)

    async def one(i: int) -> str:
        async with SandboxSession(pool, f"task-{i}", wait_s=120) as sb:
            await sb.write_file("n.txt", str(i))
            res = await sb.exec("cat n.txt; echo; ls | wc -l")
            assert res.ok, res
            return res.stdout

    async def all_of_them() -> list[str]:
        return await asyncio.gather(*(one(i) for i in range(200)))

    outputs = asyncio.run(all_of_them())
    # Each task saw its own number and only its own file: sandboxes are wiped between leases.
    assert outputs == [f"{i}\n1\n" for i in range(200)]
    wait_until(lambda: stats(pool).free == 8, 10, "all sandboxes free again")
    st = stats(pool)
    assert (st.execs, st.leased, st.waiting, st.broken) == (200, 0, 0, 0)


def test_acquire_waits_then_fails_clearly_and_hands_over_first_come_first_served(make_pool: Any) -> None:
    pool = make_pool(size=2, max_waiting=2)
    held = ray.get([pool.acquire.remote("a"), pool.acquire.remote("b")])
    started = time.monotonic()
    with pytest.raises(SandboxUnavailable, match=r"no sandbox free for task c after 0.3s \(2 in the pool, 2 leased"):
        ray.get(pool.acquire.remote("c", None, None, 0.3))
    assert 0.25 < time.monotonic() - started < 2.0

    first = pool.acquire.remote("first", None, None, 30)
    time.sleep(0.3)
    second = pool.acquire.remote("second", None, None, 30)
    time.sleep(0.3)
    # Backpressure: two callers already wait (max_waiting=2), a third is refused at once.
    with pytest.raises(SandboxUnavailable, match="2 callers already waiting"):
        ray.get(pool.acquire.remote("third", None, None, 30))
    assert stats(pool).waiting == 2
    ray.get(pool.release.remote(held[0]))
    released_at = time.monotonic()
    lease_first = ray.get(first)
    assert time.monotonic() - released_at < 1.0  # woken by the release, not by a poll
    ready, _ = ray.wait([second], timeout=0.5)
    assert not ready, "the second waiter must wait for the next release"
    ray.get(pool.release.remote(held[1]))
    lease_second = ray.get(second)
    for lease in (lease_first, lease_second):
        assert ray.get(pool.release.remote(lease)) is True
    assert ray.get(pool.release.remote(lease_first)) is False  # releasing twice is harmless


def test_sandboxes_are_recycled_after_max_uses_and_on_failure(make_pool: Any) -> None:
    pool = make_pool(size=1, max_uses=2)

    def use(failed: bool = False, cmd: str = "true") -> Any:
        lease = ray.get(pool.acquire.remote("t"))
        res = ray.get(pool.exec.remote(lease, cmd))
        ray.get(pool.release.remote(lease, failed))
        return res

    use(cmd="touch marker")
    assert use(cmd="ls -A").stdout == ""  # wiped between leases
    wait_until(lambda: stats(pool).recycled == 1 and stats(pool).free == 1, 10, "recycling after max_uses=2")
    use(failed=True)
    wait_until(lambda: stats(pool).recycled == 2 and stats(pool).free == 1, 10, "recycling after a failure")
    # A command killed at its wall-clock limit taints the sandbox: it is replaced at release.
    lease = ray.get(pool.acquire.remote("t"))
    res = ray.get(pool.exec.remote(lease, "sleep 30", SandboxLimits(wall_s=0.5)))
    assert res.timed_out and res.killed_reason == "wall"
    ray.get(pool.release.remote(lease))
    wait_until(lambda: stats(pool).recycled == 3 and stats(pool).free == 1, 10, "recycling after a timed-out command")


@ray.remote(num_cpus=0)
class Holder:
    """An agent-like actor that takes a sandbox and keeps it."""

    async def hold(self, pool: Any, task_id: str) -> int:
        self.session = SandboxSession(pool, task_id)
        await self.session.__aenter__()
        res = await self.session.exec("echo holding")
        assert res.ok
        return os.getpid()


@pytest.mark.parametrize("restarts", [0, 1], ids=["dies", "restarts"])
def test_killed_holder_sandbox_returns_to_pool(make_pool: Any, restarts: int) -> None:
    pool = make_pool(size=2)
    holder = Holder.options(max_restarts=restarts).remote()
    pid = ray.get(holder.hold.remote(pool, "task-of-a-doomed-agent"))
    assert stats(pool).free == 1 and stats(pool).leased == 1
    os.kill(pid, signal.SIGKILL)
    # Within a few liveness checks (0.5 s each) the lease is reclaimed and the sandbox replaced.
    wait_until(lambda: stats(pool).free == 2, 15, "the dead holder's sandbox back in the pool")
    st = stats(pool)
    assert (st.leased, st.reclaimed) == (0, 1)
    if restarts:  # the restarted actor is a new process and holds nothing
        assert ray.get(holder.__ray_ready__.remote())


def test_lease_ttl_reclaims_a_forgotten_lease(make_pool: Any) -> None:
    pool = make_pool(size=1, lease_ttl_s=1.0)
    lease = ray.get(pool.acquire.remote("forgotten"))
    wait_until(lambda: stats(pool).reclaimed == 1 and stats(pool).free == 1, 10, "TTL reclaim")
    with pytest.raises(LeaseNotFound, match="released, or reclaimed"):
        ray.get(pool.exec.remote(lease, "true"))


def test_named_pool_is_shared_and_missing_runtime_is_reported(ray_cluster: None, root_dir: str) -> None:
    a = get_or_create_pool("shared", {"size": 1, "root_dir": root_dir, "idle_exit_s": None})
    b = get_or_create_pool("shared", {"size": 1, "root_dir": root_dir, "idle_exit_s": None})
    assert ray.get(a.ready.remote()).name == ray.get(b.ready.remote()).name
    ray.get(a.shutdown.remote())
    ray.kill(a)
    if shutil.which("apptainer") is None:
        broken = SandboxPool.remote({"runtime": "apptainer", "apptainer": {"image": "/nonexistent.sif"}}, "broken")
        with pytest.raises(RuntimeNotInstalled, match="needs `apptainer`"):
            ray.get(broken.acquire.remote("t"))
        ray.kill(broken)


def test_next_lease_sees_nothing_of_the_previous_one(make_pool: Any) -> None:
    pool = make_pool(size=1)
    marker = f"1000.{uuid.uuid4().int % 10**6:06d}"  # `sleep 1000.NNNNNN`: findable from the host
    lease = ray.get(pool.acquire.remote("first"))
    leave_behind = (
        "echo t > /tmp/leak; echo s > /sandbox/leak; echo h > $HOME/leak-home; echo d > /dev/shm/leak; "
        "(echo v > /var/tmp/leak) 2>/dev/null; "
        f"setsid nohup sleep {marker} >/dev/null 2>&1 & (sleep {marker} >/dev/null 2>&1 &); nohup sleep {marker} >/dev/null 2>&1 & "
        "mkdir -p locked/in && touch locked/in/f && chmod 0 locked/in locked; chmod 0555 /sandbox; "
        "while [ ! -e /sandbox/go ]; do sleep 0.05; done"
    )
    running = pool.exec.remote(lease, leave_behind)
    wait_until(lambda: len(processes_with(marker, "sleep")) == 3, 30, "the three detached sleeps to run")
    pids = processes_with(marker, "sleep")
    ray.get(pool.write_file.remote(lease, "go", b""))
    assert ray.get(running).ok
    ray.get(pool.release.remote(lease))

    lease = ray.get(pool.acquire.remote("second"))  # the same (only) sandbox slot
    look = ray.get(
        pool.exec.remote(lease, "find /sandbox /tmp /dev/shm /var/tmp $HOME -mindepth 1 2>/dev/null; echo HOME=$HOME; touch /sandbox/mine && echo wrote")
    )
    assert look.stdout == "HOME=/sandbox\nwrote\n", look
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists() and marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()]
    ray.get(pool.release.remote(lease))


OTHER_UID = 4242  # another user of the node (no account needed: files and processes carry the uid)

_OTHER_USERS_POOL = """
import sys
from pathlib import Path
from matrix_hpc.services.sandbox._dirs import PoolDir
d = PoolDir(Path(sys.argv[1]))
(d.path / "slot0.0").mkdir()
(d.path / "slot0.0" / "secret").write_text("theirs")
print(d.path, flush=True)
sys.stdin.read()  # a live pool: holds its directory's lock until stdin closes
"""


def _other_users_pool(root: Path) -> subprocess.Popen[str]:
    env = {"PYTHONPATH": str(REPO), "HOME": str(root.parent), "PATH": os.environ.get("PATH", "")}
    argv = ["setpriv", "--reuid", str(OTHER_UID), "--regid", str(OTHER_UID), "--clear-groups", sys.executable, "-c", _OTHER_USERS_POOL, str(root)]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd="/")


def test_two_users_pools_share_a_root_without_colliding(ray_cluster: None) -> None:
    if os.geteuid() != 0:
        pytest.skip("acting as another uid needs root")
    base = Path(tempfile.mkdtemp(prefix="mhs-users-", dir="/tmp"))
    os.chmod(base, 0o755)
    shared = base / "sandboxes"  # made by the first pool, as anyone's would be
    pool = SandboxPool.remote({"root_dir": str(shared), "size": 1, "idle_exit_s": None}, "users-test")
    theirs = None
    try:
        ray.get(pool.ready.remote())
        assert shared.stat().st_mode & 0o7777 == 0o1777
        # Another user starts a pool on the same node and root after ours: it gets its own directory.
        theirs = _other_users_pool(shared)
        assert theirs.stdout is not None
        their_dir = Path(theirs.stdout.readline().strip())
        assert their_dir.parent == shared / f"u{OTHER_UID}", theirs.stderr.read() if theirs.stderr else ""
        st = (shared / f"u{OTHER_UID}").stat()
        assert (st.st_uid, st.st_mode & 0o777) == (OTHER_UID, 0o700)
        ours = shared / "u0"
        assert ours.stat().st_uid == 0 and ours.stat().st_mode & 0o777 == 0o711  # sandboxes run as nobody: pass-through only
        (our_dir,) = ours.glob("pool-*")

        # A second pool of ours (another run) starts and sweeps: the live pools' directories stay.
        second = SandboxPool.remote({"root_dir": str(shared), "size": 1, "idle_exit_s": None}, "users-test-2")
        ray.get(second.ready.remote())
        lease = ray.get(second.acquire.remote("t"))
        assert ray.get(second.exec.remote(lease, "echo hi > f && cat f")).stdout == "hi\n"
        ray.get(second.shutdown.remote())
        ray.kill(second)
        assert (their_dir / "slot0.0" / "secret").read_text() == "theirs" and our_dir.is_dir()

        # The other user's pool ends; only that user's next pool sweeps its directory, never ours.
        theirs.communicate(timeout=30)
        again = _other_users_pool(shared)
        assert again.stdout is not None
        new_dir = Path(again.stdout.readline().strip())
        again.communicate(timeout=30)
        assert not their_dir.exists() and new_dir.parent == their_dir.parent and our_dir.is_dir()
    finally:
        if theirs is not None and theirs.poll() is None:
            theirs.kill()
        ray.get(pool.shutdown.remote())
        ray.kill(pool)
        shutil.rmtree(base, ignore_errors=True)


_CONNECT = """
import json, socket, sys
out = {}
for target in json.loads(sys.argv[1]):
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        out[target] = "connected"
    except OSError as exc:
        out[target] = f"failed: {exc.errno}"
print(json.dumps(out))
"""


def test_a_sandbox_reaches_none_of_the_runs_ports_unless_network_is_on(make_pool: Any, runtime_cfg: dict[str, Any]) -> None:
    """What a tool call's code could attack from inside a sandbox: the run's Ray ports (GCS,
    raylet, object manager, metrics export) and an LLM endpoint on loopback (the embedded
    engine and a one-node vLLM listen there). With sandbox network off (the default) none
    answers; with it on, all do (so the check can fail)."""
    node = next(n for n in ray.nodes() if n["Alive"])
    targets = [ray.get_runtime_context().gcs_address] + [
        f"{node['NodeManagerAddress']}:{node[k]}" for k in ("NodeManagerPort", "ObjectManagerPort", "MetricsExportPort")
    ]
    with socket.create_server(("127.0.0.1", 0)) as llm:  # where a run's engine listens
        targets.append(f"127.0.0.1:{llm.getsockname()[1]}")
        reached = {}
        for network in (False, True):
            settings = {runtime_cfg["runtime"]: {**runtime_cfg.get(runtime_cfg["runtime"], {}), "network": network}}
            pool = make_pool(size=1, **settings)

            async def probe(pool: Any = pool) -> dict[str, str]:
                async with SandboxSession(pool, f"probe-{network}", wait_s=60) as sb:
                    res = await sb.exec(["python3", "-c", _CONNECT, json.dumps(targets)])
                    assert res.exit_code == 0, res
                    return json.loads(res.stdout)  # type: ignore[no-any-return]

            reached[network] = asyncio.run(probe())
    assert all(v.startswith("failed") for v in reached[False].values()), reached[False]
    assert all(v == "connected" for v in reached[True].values()), reached[True]
