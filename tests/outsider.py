"""An outsider: a process of another user that found a run's ports (``ss -ltn`` shows them to
everyone) but has none of its secrets. The security tests run it with another HOME and no
Ray or key variables (:func:`outsider_env`); on the Slurm test cluster, from a host of the
bridge that is not in the job.

    python tests/outsider.py grpc HOST:PORT...  each gRPC service a Ray process may serve, no token
    python tests/outsider.py http URL           one GET (or POST with --json BODY), no key
    python tests/outsider.py join ADDRESS       ray.init(address=ADDRESS) and one task

Each prints one JSON line; ``join`` says whether it ran code in the cluster (Ray's client
retries a refused token for ever: it is stopped once its log says the token was refused).
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

# One method per gRPC service that Ray's processes serve (GCS, raylet's node and object
# managers, core workers: driver and actors, dashboard agent, Ray Client server). An empty
# request is a valid protobuf message: a server without the token check would answer it, or
# fail inside the method.
GRPC_METHODS = (
    "/ray.rpc.NodeInfoGcsService/GetAllNodeInfo",
    "/ray.rpc.InternalKVGcsService/InternalKVKeys",
    "/ray.rpc.NodeManagerService/GetNodeStats",
    "/ray.rpc.ObjectManagerService/Pull",
    "/ray.rpc.CoreWorkerService/GetCoreWorkerStats",
    "/ray.rpc.ReporterService/HealthCheck",
    "/ray.rpc.RayletDriver/ClusterInfo",
)


def outsider_env(home: str | os.PathLike[str]) -> dict[str, str]:
    """This process's environment as another user would have it: their own HOME (no
    ``~/.ray/auth_token``), and none of Ray's or the run's variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MATRIX_HPC_"))}
    Path(home).mkdir(parents=True, exist_ok=True)
    return {**env, "HOME": str(home)}


def grpc_probe(target: str) -> dict[str, str]:
    """Method -> gRPC status name: UNAUTHENTICATED is a refusal; UNIMPLEMENTED means the port
    serves another service; OK or anything else means the server let the call in."""
    import grpc

    out = {}
    with grpc.insecure_channel(target) as channel:
        for method in GRPC_METHODS:
            call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            try:
                call(b"", timeout=15)
                out[method] = "OK"
            except grpc.RpcError as exc:
                out[method] = exc.code().name  # type: ignore[attr-defined]
    return out


def http_probe(url: str, body: str | None) -> dict[str, object]:
    req = urllib.request.Request(url, data=body.encode() if body else None, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return {"status": resp.status, "body": resp.read(1 << 20).decode(errors="replace")}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code}
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:  # a port that does not speak HTTP
        return {"status": None, "error": f"{type(exc).__name__}: {exc}"}


REFUSED = ("InvalidAuthToken", "Unauthenticated", "UNAUTHENTICATED")
"""What Ray's client logs when the cluster refuses its token (it then retries for ever)."""


def _join(address: str) -> None:
    # Ray's client rewrites a 127.0.0.1 address to the machine's own (where a local run is not
    # listening); where multi-node clusters are off it does not. An attacker would turn them off.
    if address.startswith("127."):
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    ray.init(address=address, logging_level="INFO")
    pid = ray.get(ray.remote(lambda: os.getpid()).remote(), timeout=60)
    print(f"JOINED: ran code in the cluster as pid {pid}", flush=True)


def join(address: str, timeout_s: float = 90.0) -> dict[str, object]:
    """``ray.init(address)`` and one task, in a child process: whether it ran code there, and
    whether Ray said its token was refused (the child is stopped then, or at ``timeout_s``)."""
    import subprocess
    import time

    child = subprocess.Popen([sys.executable, __file__, "_join", address], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert child.stdout is not None
    os.set_blocking(child.stdout.fileno(), False)
    log, deadline = b"", time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            log += child.stdout.read() or b""
            text = log.decode(errors="replace")
            if any(r in text for r in REFUSED) or "JOINED" in text or child.poll() is not None:
                break
            time.sleep(0.2)
    finally:
        child.kill()
        child.wait()
    text = (log + (child.stdout.read() or b"")).decode(errors="replace")
    return {"joined": "JOINED" in text, "refused": any(r in text for r in REFUSED), "log": text[-2000:]}


def main(argv: list[str]) -> int:
    what, target = argv[0], argv[1]
    if what == "grpc":
        print(json.dumps({t: grpc_probe(t) for t in argv[1:]}), flush=True)
    elif what == "http":
        body = argv[3] if len(argv) > 3 and argv[2] == "--json" else None
        print(json.dumps(http_probe(target, body)), flush=True)
    elif what == "join":
        print(json.dumps(join(target)), flush=True)
    elif what == "_join":
        _join(target)
    else:
        raise SystemExit(f"unknown probe {what!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
