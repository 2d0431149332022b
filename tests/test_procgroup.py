"""A managed server's process group does not outlive the process that started it.

vLLM's engine core was seen to outlive its API server when the replica actor was killed with
the run (two orphaned engines of 1.9 GB each kept a test machine busy for the rest of its
suite). The server here is a stand-in with vLLM's shape, started by the real ``VLLMServer``
code in a process of its own that is then SIGKILLed, as Ray kills an actor: its leader exits
on the SIGTERM of ``PR_SET_PDEATHSIG`` and leaves its child behind, as the engine core was.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from matrix_hpc.services.llm.procgroup import group_members

from .conftest import REPO, wait_for

# The "API server": forks an "engine core" that does not die with it, then waits.
TREE = r"""
import os, signal, sys, time
if os.fork() == 0:  # the engine core: ignores the hang-ups of its parent's end
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    while True:
        time.sleep(1)
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # exits at once, its child left behind
while True:
    time.sleep(1)
"""

# The "replica actor": starts the server as VLLMServer does (from this thread), says its
# group, and waits to be killed.
STARTER = r"""
import sys, time
from matrix_hpc.services.llm.vllm import VLLMServer

class StandIn(VLLMServer):
    @property
    def command(self):
        return [sys.executable, "-c", sys.argv[1]]

server = StandIn("unused", device="cpu", log_dir=sys.argv[2])
server.start()
print(server.pid, flush=True)
time.sleep(600)
"""


def test_a_killed_starter_leaves_nothing_of_its_servers_group(tmp_path: Path) -> None:
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER, TREE, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    pgid = 0
    try:
        assert starter.stdout is not None
        pgid = int(starter.stdout.readline())
        # The stand-in's "engine core" is up.
        wait_for(lambda: len(group_members(pgid)) >= 2, 30, "the server's group (leader and child)")
        starter.send_signal(signal.SIGKILL)  # as Ray kills an actor: nothing of it runs
        starter.wait()
        deadline = time.monotonic() + 30
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = group_members(pgid)
        assert not left, f"processes of the server's group outlived its starter: {left}"
    finally:
        if starter.poll() is None:
            starter.kill()
        if pgid:
            for pid in group_members(pgid):  # without the reaper: what this test found
                os.kill(pid, signal.SIGKILL)
