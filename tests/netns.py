"""Private networks for test "hosts": a bridge, named network namespaces and veth pairs.

``TestNet(owner_pid)`` creates, as root:

* a bridge ``mhpc<pid>s<n>`` on this host with the address ``<subnet>.1/24``, where
  ``<subnet>`` is a ``10.x.y`` /24 that no host interface or route uses and ``<n>`` counts
  the networks this process made (a module's own cluster may run beside the session's);
* per host name ``h``, a network namespace ``mhpc-<pid>-<n>-<h>`` whose ``eth0`` (a veth
  whose other end ``mh<pid>s<n><h>`` is on the bridge) has the address ``<subnet>.<k>`` and
  whose only routes are the bridge's subnet and its own ``lo``.

There is no default route in any namespace and IP forwarding is not touched: traffic
between namespaces (and the host's bridge address, where test clients run) never
leaves the bridge. ``remove()`` deletes it all. ``clean_stale()`` deletes what a dead
session left (names carry the owner's pid; a live owner's are left alone), after
SIGKILLing any process still inside those namespaces.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import random
import re
import signal
import subprocess
from pathlib import Path

__all__ = ["TestNet", "clean_stale"]

NETNS_DIR = Path("/run/netns")
_NS_RE = re.compile(r"^mhpc-(\d+)-")
_LINK_RE = re.compile(r"^mh(?:pc)?(\d+)")
_SEQ = itertools.count()
_SEQ_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pids_in_netns(name: str) -> list[int]:
    out = _ip("netns", "pids", name, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def clean_stale(keep_pid: int | None = None) -> list[str]:
    """Remove namespaces, bridges and veths of test sessions whose owner pid is dead; returns their names."""
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = _NS_RE.match(name)
        if not m or int(m.group(1)) == keep_pid or _pid_alive(int(m.group(1))):
            continue
        for pid in _pids_in_netns(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _ip("netns", "del", name, check=False)
        removed.append(name)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@")[0]
        m = _LINK_RE.match(name)
        if not m or int(m.group(1)) == keep_pid or _pid_alive(int(m.group(1))):
            continue
        _ip("link", "del", name, check=False)
        removed.append(name)
    return removed


def _used_networks() -> list[ipaddress.IPv4Network]:
    nets = []
    for line in _ip("-4", "-o", "addr", "show", check=False).stdout.splitlines():
        m = re.search(r"inet (\S+)", line)
        if m:
            nets.append(ipaddress.ip_interface(m.group(1)).network)
    for line in _ip("-4", "route", "show", "table", "all", check=False).stdout.splitlines():
        tok = line.split()[0] if line.strip() else ""
        with contextlib.suppress(ValueError):
            if tok not in ("default", "local", "broadcast", "unreachable"):
                nets.append(ipaddress.ip_network(tok, strict=False))
    return nets


def _free_subnet() -> str:
    used = _used_networks()
    for _ in range(200):
        net = ipaddress.ip_network(f"10.{random.randrange(200, 255)}.{random.randrange(0, 256)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return str(net.network_address).rsplit(".", 1)[0]
    raise RuntimeError("no free 10.x.y.0/24 for the test network")


class TestNet:
    """One session's bridge and namespaces (see the module docstring)."""

    __test__ = False  # not a pytest class

    def __init__(self, owner_pid: int | None = None) -> None:
        self.owner = owner_pid or os.getpid()
        self.seq = _SEQ_CHARS[next(_SEQ) % len(_SEQ_CHARS)]  # interface names have 15 characters at most
        self.bridge = f"mhpc{self.owner}s{self.seq}"
        self.subnet = _free_subnet()
        self.host_addr = f"{self.subnet}.1"
        self.addrs: dict[str, str] = {}
        self._up = False

    def ns_name(self, host: str) -> str:
        return f"mhpc-{self.owner}-{self.seq}-{host}"

    def _veth(self, host: str) -> str:
        return f"mh{self.owner}s{self.seq}{host}"

    def ns_path(self, host: str) -> str:
        return str(NETNS_DIR / self.ns_name(host))

    def create(self) -> TestNet:
        clean_stale(keep_pid=self.owner)
        _ip("link", "add", self.bridge, "type", "bridge")
        self._up = True
        _ip("addr", "add", f"{self.host_addr}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        return self

    def add_host(self, host: str, index: int) -> str:
        """A namespace for ``host`` with the address ``<subnet>.<index>``; returns the address."""
        assert 1 < index < 255 and re.fullmatch(r"[a-z0-9]{1,3}", host), (host, index)
        ns, veth, addr = self.ns_name(host), self._veth(host), f"{self.subnet}.{index}"
        _ip("netns", "add", ns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", veth, "master", self.bridge, "up")
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        self.addrs[host] = addr
        return addr

    def set_link(self, host: str, up: bool) -> None:
        """Plug (``up``) or unplug ``host``'s cable: its bridge-side veth end."""
        _ip("link", "set", self._veth(host), "up" if up else "down")

    def remove(self) -> None:
        if not self._up:
            return
        for host in list(self.addrs):
            for pid in _pids_in_netns(self.ns_name(host)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _ip("netns", "del", self.ns_name(host), check=False)
            _ip("link", "del", self._veth(host), check=False)
        _ip("link", "del", self.bridge, check=False)
        self.addrs.clear()
        self._up = False
