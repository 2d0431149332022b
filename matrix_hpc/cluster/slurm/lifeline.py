"""A TCP connection from every node to the driver on rank 0: the run's end, or the driver's death.

Rank 0 listens (:class:`Lifeline`, a kernel-chosen port on its node address, published with the
Ray head's address and a random token every rank's hello must carry) and every other rank holds
one connection to it for the whole life (:class:`DriverLink`). Two things travel on it that no file on a shared filesystem can carry
reliably:

* **The end of the run.** Rank 0 sends ``done`` to every rank and waits (bounded) for each
  rank's ``ack`` before it stops its Ray head. A ``done`` file alone is not enough: NFS caches
  a failed lookup for up to ``acdirmax`` (60 s), so a worker could miss a new ``done``, see the
  head go away, and requeue a finished job.
* **The driver's death.** A driver killed by SIGKILL, the OOM killer or a segfault sends no
  ``done``; its kernel closes the connection, and a new connect is refused while its node is up.
  So a worker knows within a poll that the driver is gone, whatever became of the Ray head
  (it lives on where the job's process tracking lets it escape). Both facts come from the
  driver's kernel, not from a thread of the driver, so a long pause in the driver does not
  look like a death. A node that is down or cut off answers nothing: that is still the Ray
  head watch's (``cluster.slurm.head_lost_s``).
"""

from __future__ import annotations

import hmac
import logging
import secrets
import selectors
import socket
import threading
import time
from typing import Literal

__all__ = ["ACK_TIMEOUT_S", "DriverLink", "Lifeline", "LinkState"]

log = logging.getLogger(__name__)

ACK_TIMEOUT_S = 10.0
"""How long rank 0 waits, at the end of a life, for the ranks that have not acknowledged ``done``
(only a rank whose node died or never joined makes it wait that long)."""

_DONE, _ACK, _HELLO, _OK = b"done\n", b"ack\n", b"rank ", b"ok\n"
_CONNECT_S = 10.0

LinkState = Literal["running", "done", "dead", "unreachable"]
"""``done``: rank 0 said the run is over. ``dead``: the driver process is gone (its connection
closed without ``done`` and its node refuses a new one). ``unreachable``: its node does not answer."""


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


class Lifeline:
    """Rank 0's side: accepts every rank's connection; :meth:`end` tells them the run is over."""

    def __init__(self, host: str) -> None:
        self._server = socket.create_server((host, 0), backlog=1024)  # not inheritable: dies with this process
        self.port: int = self._server.getsockname()[1]
        self.address = f"{host}:{self.port}"
        self.token = secrets.token_hex(16)
        """Published with the address (the rendezvous): a hello without it is dropped, so no other
        process on the network can take a rank's place and keep the end from reaching it."""
        self._joined: set[int] = set()
        """Ranks that connected: each is told the end and waited for. One that never connected
        finds the lifeline closed, and ends without requeueing (see :class:`DriverLink`)."""
        self._peers: dict[int, socket.socket] = {}
        self._lock = threading.Lock()
        self._done = False
        self._thread = threading.Thread(target=self._accept_loop, name="lifeline-accept", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, peer = self._server.accept()
            except OSError:  # closed by end()
                return
            try:
                self._register(conn)
            except Exception as exc:  # one bad peer never ends the loop
                log.warning("lifeline: connection from %s dropped: %s", peer, exc)
                conn.close()

    def _register(self, conn: socket.socket) -> None:
        conn.settimeout(_CONNECT_S)
        line = b""
        while not line.endswith(b"\n") and len(line) < 128:
            chunk = conn.recv(128 - len(line))
            if not chunk:
                raise ConnectionError("closed before its hello")
            line += chunk
        if not line.startswith(_HELLO):
            raise ValueError(f"expected a hello, got {line[:32]!r}")
        rank_s, _, token = line[len(_HELLO) :].strip().decode(errors="replace").partition(" ")
        if not hmac.compare_digest(token, self.token):
            raise ValueError("a hello with a wrong token")
        rank = int(rank_s)
        with self._lock:
            old = self._peers.pop(rank, None)
            self._peers[rank] = conn
            self._joined.add(rank)
            done = self._done
        if old is not None:  # the rank reconnected (its first connection broke): keep the new one
            old.close()
        conn.sendall(_DONE if done else _OK)  # done: it came after end() had begun
        log.info("lifeline: rank %d connected", rank)

    def end(self, timeout_s: float = ACK_TIMEOUT_S) -> list[int]:
        """Send ``done`` to every rank that connected and wait up to ``timeout_s`` for each one's
        ``ack`` (one whose connection closes counts as told); returns the ranks that never
        acknowledged. Closes the lifeline."""
        with self._lock:
            self._done = True
            peers = dict(self._peers)
        for conn in peers.values():
            try:
                conn.sendall(_DONE)
            except OSError:
                pass  # its connection is gone: nothing left there to tell
        deadline = time.monotonic() + timeout_s
        acked: set[int] = set()
        sel = selectors.DefaultSelector()
        try:
            while True:
                with self._lock:
                    peers = dict(self._peers)
                    pending = self._joined - acked
                if not pending or time.monotonic() >= deadline:
                    break
                open_ = {r: c for r, c in peers.items() if r in pending}
                for r, c in open_.items():
                    try:
                        sel.register(c, selectors.EVENT_READ, r)
                    except (KeyError, ValueError):
                        pass  # registered already, or closed
                for key, _ in sel.select(timeout=min(0.2, max(0.0, deadline - time.monotonic()))):
                    try:
                        data = key.fileobj.recv(64)  # type: ignore[union-attr]
                    except OSError:
                        data = b""
                    if not data or _ACK in data:
                        acked.add(key.data)
                        sel.unregister(key.fileobj)
        finally:
            sel.close()
            self.close()
        with self._lock:
            missing = sorted(self._joined - acked)
        if missing:
            log.warning("lifeline: rank(s) %s did not acknowledge the end of the run in %.0fs", missing, timeout_s)
        return missing

    def close(self) -> None:
        try:
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accept loop (close alone does not)
        except OSError:
            pass
        self._server.close()
        with self._lock:
            peers, self._peers = list(self._peers.values()), {}
        for conn in peers:
            conn.close()


class DriverLink:
    """A worker rank's side: one connection to rank 0's :class:`Lifeline`, polled without blocking."""

    def __init__(self, address: str, token: str, rank: int, retry_s: float = 2.0) -> None:
        """Returns once rank 0 has registered this rank (so it waits for this rank's ``ack`` at the
        end); ConnectionRefusedError when rank 0 has ended (or died) before: this rank never saw a
        live driver and so cannot tell a death from an end."""
        self.address, self.token, self.rank, self.retry_s = address, token, rank, retry_s
        self._buf = b""
        self._retry_at = 0.0
        self._sock = self._connect()
        if self._sock is None:
            raise ConnectionRefusedError(f"rank 0's lifeline {address} is closed: the driver has ended")

    def _connect(self) -> socket.socket | None:
        """A connection rank 0 has registered (it answered ``ok``, or ``done``: kept for :meth:`poll`),
        or None when refused or closed first (the driver has ended or died); OSError when unreachable."""
        try:
            sock = socket.create_connection(_split(self.address), timeout=_CONNECT_S)
        except ConnectionRefusedError:
            return None
        try:
            sock.sendall(_HELLO + f"{self.rank} {self.token}\n".encode())
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(16)
                if not chunk:
                    sock.close()
                    return None
                reply += chunk
        except (ConnectionResetError, BrokenPipeError):
            sock.close()
            return None
        except OSError:
            sock.close()
            raise
        self._buf = _DONE if reply == _DONE else b""
        sock.setblocking(False)
        return sock

    def poll(self) -> LinkState:
        """What the link says now. Blocks at most for one connect (``unreachable``: tried again
        every ``retry_s``; deciding that the head node is lost is the Ray head watch's job)."""
        while True:
            if self._sock is None:
                state = self._reconnect()
                if state != "running":
                    return state
            assert self._sock is not None
            if _DONE in self._buf:
                try:
                    self._sock.sendall(_ACK)
                except OSError:
                    pass  # rank 0 stopped waiting: it knows the end was told
                return "done"
            try:
                data = self._sock.recv(64)
            except BlockingIOError:
                return "running"
            except OSError:
                data = b""
            if not data:  # closed with no ``done``: the driver died, unless a new connection is taken
                self._sock.close()
                self._sock = None
                continue
            self._buf += data

    def _reconnect(self) -> LinkState:
        now = time.monotonic()
        if now < self._retry_at:
            return "unreachable"
        self._retry_at = now + self.retry_s
        try:
            sock = self._connect()
        except OSError:
            return "unreachable"
        if sock is None:
            return "dead"
        log.warning("lifeline: the connection to rank 0 broke but a new one was accepted; the driver is alive")
        self._sock = sock
        return "running"

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
