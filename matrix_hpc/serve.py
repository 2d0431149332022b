"""``matrix-hpc serve``: just the LLM service of a config, for debugging and sharing.

Starts Ray and the run's endpoint registry with its replicas exactly as ``run``
would, prints the endpoints, writes them to ``OUTPUT/services.json`` (what
``check-health`` reads) and keeps them supervised until SIGINT/SIGTERM.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .cluster import start_ray
from .config import load_config
from .services.llm.service import LLMService
from .store.fsutil import atomic_write_json

__all__ = ["serve"]

log = logging.getLogger(__name__)


def _write(path: Path, model: str, endpoints: list[dict[str, Any]]) -> None:
    atomic_write_json(path, {"model": model, "llm": endpoints, "updated_at": time.time()}, durable=False)


def serve(config_path: str, overrides: list[str], until: threading.Event | None = None) -> int:
    config = load_config(config_path, overrides)
    stop = until or threading.Event()
    if until is None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    out = Path(config.output.path).expanduser().resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    run_id = f"serve-{uuid.uuid4().hex[:8]}"
    cluster = start_ray(config.cluster, f"matrix-hpc-{run_id}")
    service: LLMService | None = None
    try:
        service = LLMService(config.llm, run_id, cluster.namespace, out / "logs")
        t0 = time.monotonic()
        service.start()
        status_file = out / "services.json"
        _write(status_file, config.llm.model, service.endpoints)
        print(f"{config.llm.engine} service ready in {time.monotonic() - t0:.1f}s; model {config.llm.model!r}")
        for e in service.endpoints:
            print(f"  {e['url']}  pid {e.get('pid')}  log {e.get('log') or '-'}")
        print(f"endpoints written to {status_file}; Ctrl-C stops the service", flush=True)
        last: list[tuple[str, str]] = []
        while not stop.wait(max(1.0, config.llm.health_interval_s)):
            endpoints = service.status()
            now = [(e["url"], e["state"]) for e in endpoints]
            if now != last:
                _write(status_file, config.llm.model, endpoints)
                if last:
                    print("endpoints: " + ", ".join(f"{u} {s}" for u, s in now), flush=True)
                last = now
    finally:
        if service is not None:
            service.stop()
        cluster.shutdown()
    sys.stdout.write("service stopped\n")
    return 0
