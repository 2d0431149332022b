"""The start-of-life node checks: a probe file per node in ``output.path``, node-local locks.

The probe runs for real across processes on this machine's filesystem; a "blind"
node is one whose ``output.path`` is a different directory (as a node-local /tmp is).
The Slurm version of it, with real separate /tmp per node, is in test_slurm_nodes.py.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from matrix_hpc.cluster.slurm.nodecheck import SharedPathError, cleanup_temp_dirs, node_local_locks, probe_shared_path

MOUNTS = """\
/dev/vda / ext4 rw,relatime 0 0
10.0.0.1@o2ib:/lus /lus lustre rw,localflock 0 0
10.0.0.1@o2ib:/proj /proj lustre rw,flock 0 0
srv:/home /home nfs4 rw,vers=4.2,local_lock=none 0 0
srv:/scratch /scratch nfs rw,vers=3,local_lock=flock 0 0
"""


def test_node_local_locks_named_by_mount_option() -> None:
    assert node_local_locks(Path("/lus/u/run"), MOUNTS) == "/lus (lustre) is mounted with localflock"
    assert node_local_locks(Path("/scratch/x"), MOUNTS) == "/scratch (nfs) is mounted with local_lock=flock"
    assert node_local_locks(Path("/proj/x"), MOUNTS) is None  # global flock
    assert node_local_locks(Path("/home/x"), MOUNTS) is None
    assert node_local_locks(Path("/lustre-not/x"), MOUNTS) is None  # a prefix of the name is not the mount


def test_probe_passes_when_every_rank_sees_the_same_directory(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            probe_shared_path(tmp_path / "out", "7.0", r, 3, f"n{r + 1}", timeout_s=20)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(p.name for p in (tmp_path / "out" / ".nodes" / "7.0").iterdir()) == ["rank0-n1", "rank1-n2", "rank2-n3"]


def test_probe_names_the_node_that_cannot_see_output_path(tmp_path: Path) -> None:
    results: dict[int, str] = {}

    def rank(r: int, path: Path) -> None:
        with pytest.raises(SharedPathError) as exc:
            probe_shared_path(path, "7.0", r, 2, f"n{r + 1}", timeout_s=1)
        results[r] = str(exc.value)

    # n2's output.path is its own directory (a node-local path): neither sees the other
    threads = [threading.Thread(target=rank, args=(0, tmp_path / "a")), threading.Thread(target=rank, args=(1, tmp_path / "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[1].startswith(f"output.path {tmp_path / 'b'} is not visible from node n2: rank 0's probe file never appeared")
    assert results[0].startswith(f"output.path {tmp_path / 'a'} is not visible from node(s) 1 of 2 ranks:")  # no Slurm: no host list
    assert all("\n" not in r for r in results.values())


def test_cleanup_temp_dirs_keeps_this_life_and_other_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = [Path(f"/tmp/mhpc-9{n}.{r}") for n in (1, 2) for r in (0, 1, 2)]
    for d in made:
        (d / "session").mkdir(parents=True, exist_ok=True)
    try:
        removed = cleanup_temp_dirs("91", 2, keep_current=True)
        assert sorted(removed) == ["/tmp/mhpc-91.0", "/tmp/mhpc-91.1"]
        assert Path("/tmp/mhpc-91.2").is_dir() and all(Path(f"/tmp/mhpc-92.{r}").is_dir() for r in range(3))
        assert cleanup_temp_dirs("91", 2, keep_current=False) == ["/tmp/mhpc-91.2"]
    finally:
        for d in made:
            shutil.rmtree(d, ignore_errors=True)


def test_a_server_advertises_the_node_address_on_a_multi_node_ray_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the bootstrap's MATRIX_HPC_NODE_IP (a Ray cluster started by hand), a replica must
    not advertise loopback once another node may call it: it takes Ray's node address."""
    import ray
    from ray.cluster_utils import Cluster

    from matrix_hpc.labels import NODE_IP_ENV, node_host

    monkeypatch.delenv(NODE_IP_ENV, raising=False)
    from matrix_hpc.cluster.auth import RayAuth
    from matrix_hpc.credentials import new_secret

    auth = RayAuth(token=new_secret())  # the cluster is token-authenticated, as a run's
    ip = "127.0.1.7"  # an address of this machine that is not 127.0.0.1 (which Ray rewrites)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": ip, "include_dashboard": False})
    try:
        ray.init(address=cluster.address, _node_ip_address=ip, logging_level="WARNING")
        assert node_host() == "127.0.0.1"  # one node: loopback is right
        cluster.add_node(num_cpus=1, node_ip_address=ip)
        cluster.wait_for_nodes()
        assert node_host() == ip
        monkeypatch.setenv(NODE_IP_ENV, "10.9.8.7")
        assert node_host() == "10.9.8.7"  # the bootstrap's choice wins
    finally:
        ray.shutdown()
        cluster.shutdown()
        auth.restore()
