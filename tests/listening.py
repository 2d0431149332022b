"""The TCP sockets a tree of processes listens on, read from /proc (what ``ss -ltnp`` shows).

``/proc/net/tcp{,6}`` lists this network namespace's sockets by inode; each process's
``/proc/PID/fd`` links name the inodes it holds.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass

__all__ = ["Listener", "descendants", "listeners", "loopback"]


@dataclass(frozen=True)
class Listener:
    pid: int
    name: str
    """The process's whole command line (matched on: a cut one hid its script behind a long
    checkout path); printed cut to 100 characters."""
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port} ({self.name.strip()[:100]} pid {self.pid})"


def _addr(hexaddr: str) -> tuple[str, int]:
    ip, port = hexaddr.split(":")
    raw = bytes.fromhex(ip)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1]), int(port, 16)
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))  # four host-order words
    mapped = ipaddress.IPv6Address(raw).ipv4_mapped  # ::ffff:10.0.0.1, an IPv6 socket bound to 10.0.0.1
    return (str(mapped) if mapped else socket.inet_ntop(socket.AF_INET6, raw)), int(port, 16)


def _listening(netns_pid: int | str = "self") -> dict[int, tuple[str, int]]:
    out = {}
    for table in ("tcp", "tcp6"):
        try:
            lines = open(f"/proc/{netns_pid}/net/{table}").read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A":  # TCP_LISTEN
                out[int(f[9])] = _addr(f[1])
    return out


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it (by parent pid; sessions and groups do not matter)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def listeners(pids: list[int]) -> list[Listener]:
    """Every listening TCP socket the processes ``pids`` hold (in their network namespace)."""
    found: list[Listener] = []
    tables: dict[str, dict[int, tuple[str, int]]] = {}
    for pid in pids:
        try:
            netns = os.readlink(f"/proc/{pid}/ns/net")
            table = tables.setdefault(netns, _listening(pid))
            name = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # exited meanwhile
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and int(link[8:-1]) in table:
                host, port = table[int(link[8:-1])]
                found.append(Listener(pid, name, host, port))
    return sorted(set(found), key=lambda x: (x.port, x.pid))


def loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback
