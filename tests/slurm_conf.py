"""The configuration files of the test Slurm cluster (``tests/slurm_cluster.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .slurm_cluster import SlurmCluster

__all__ = ["write_configs"]


def write_configs(self: SlurmCluster) -> None:
    """slurm.conf, slurmdbd.conf, cgroup.conf, plugstack.conf and the hosts file every host mounts."""
    b = self.base
    auth_info = f"socket={self.munge_socket},cred_expire={self.cred_expire_s}"
    nodes = ",".join(self.nodes)
    node_lines = "\n".join(
        f"NodeName={n} NodeHostname={n} NodeAddr={self.node_addr[n]} Port={self.ports[n]} "
        f"CPUs={self.cpus_per_node} RealMemory={self.real_memory_mb} State=UNKNOWN"
        for n in self.nodes
    )
    self.conf_path.write_text(f"""\
# written by tests/slurm_cluster.py
ClusterName={self.name}
FirstJobId={self.first_job_id}
SlurmctldHost=ctl({self.ctl_addr})
SlurmctldPort={self.ports["ctld"]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo={auth_info}
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool/%n
SlurmctldPidFile={b}/run/slurmctld.pid
SlurmdPidFile={b}/run/slurmd-%n.pid
SlurmctldLogFile={b}/log/slurmctld.log
SlurmdLogFile={b}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={b}/etc/plugstack.conf
ProctrackType={self.proctrack}
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost={self.ctl_addr}
AccountingStoragePort={self.ports["dbd"]}
AccountingStoragePass={self.munge_socket}
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MailProg=/bin/true
InactiveLimit=0
MinJobAge=300
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
{node_lines}
PartitionName=low Nodes={nodes} Default=YES PriorityTier=1 PreemptMode=REQUEUE GraceTime={self.grace_time_s} MaxTime=INFINITE State=UP
PartitionName=high Nodes={nodes} Default=NO PriorityTier=10 PreemptMode=OFF MaxTime=INFINITE State=UP
{self.extra_conf}
""")
    (self.etc / "plugstack.conf").write_text("")
    (self.etc / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nConstrainCores=no\nConstrainRAMSpace=no\n")
    dbd = self.etc / "slurmdbd.conf"
    dbd.write_text(f"""\
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
DbdHost=localhost
DbdAddr={self.ctl_addr}
DbdPort={self.ports["dbd"]}
SlurmUser=root
PidFile={b}/run/slurmdbd.pid
LogFile={b}/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
""")
    dbd.chmod(0o600)
    hosts = [line for line in Path("/etc/hosts").read_text().splitlines() if not line.strip().startswith("127.0.1.")]
    hosts += [f"{self.ctl_addr}\tctl"] + [f"{self.node_addr[n]}\t{n}" for n in self.nodes]
    (self.etc / "hosts").write_text("\n".join(hosts) + "\n")
