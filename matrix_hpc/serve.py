"""``matrix-hpc serve``: just the LLM service of a config, for debugging and sharing.

Starts Ray and the run's endpoint registry with its replicas exactly as ``run``
would, prints the endpoints, writes them to ``OUTPUT/services.json`` (what
``check-health`` reads) and keeps them supervised until SIGINT/SIGTERM (USR2 leaves it serving: ``stopsignals.py``). Managed servers
take a fresh API key: ``serve`` prints the path of its 0600 file, never the key.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import uuid
from pathlib import Path

from .cluster import start_ray
from .config import load_config
from .config.checks import model_key
from .credentials import new_secret_file, remove_secret
from .services.llm.service import LLMServices
from .services.llm.status import EndpointStatus
from .stopsignals import StopSignals
from .store.fsutil import atomic_write_json
from .store.layout import RunLayout
from .store.writable import check_output_writable

__all__ = ["serve"]

log = logging.getLogger(__name__)


def _write(path: Path, endpoints: list[EndpointStatus]) -> None:
    atomic_write_json(path, {"llm": [e.to_dict() for e in endpoints], "updated_at": time.time()}, durable=False)


def serve(config_path: str, overrides: list[str], until: threading.Event | None = None) -> int:
    config = load_config(config_path, overrides)
    # INT and TERM stop it, USR2 leaves it serving (matrix_hpc/stopsignals.py).
    stop = until or StopSignals(notify=None, serving=True)
    out = RunLayout(check_output_writable(config.output.path))  # services.json and logs go there
    out.logs.mkdir(parents=True, exist_ok=True)
    run_id = f"serve-{uuid.uuid4().hex[:8]}"
    cluster = start_ray(config.cluster, f"matrix-hpc-{run_id}")
    services: LLMServices | None = None
    key_file = None
    try:
        key_file = new_secret_file(out.llm_key(run_id)) if any(m.engine != "external" for m in config.models.values()) else None
        keys = {n: model_key(config, n) for n in config.models}
        services = LLMServices(config.models, run_id, cluster.namespace, out.logs, keys, str(key_file) if key_file else None)
        t0 = time.monotonic()
        services.start()
        status_file = out.services_json
        _write(status_file, services.endpoints)
        print(f"LLM services ready in {time.monotonic() - t0:.1f}s: models {', '.join(repr(n) for n in config.models)}")
        for e in services.endpoints:
            print(f"  {e.model}: {e.url}  pid {e.pid}  log {e.log or '-'}")
        if key_file is not None:
            print(f"API key of the managed endpoints: in {key_file} (readable by you only); send it as "
                  f'-H "Authorization: Bearer $(cat {key_file})"')  # fmt: skip
        print(f"endpoints written to {status_file}; Ctrl-C stops the service", flush=True)
        last: list[tuple[str, str]] = []
        interval = min(m.health_interval_s for m in config.models.values())
        while not stop.wait(max(1.0, interval)):
            endpoints = services.status()
            now = [(e.url, e.state) for e in endpoints]
            if now != last:
                _write(status_file, endpoints)
                if last:
                    print("endpoints: " + ", ".join(f"{u} {s}" for u, s in now), flush=True)
                last = now
    finally:
        if services is not None:
            services.stop()
        cluster.shutdown()
        remove_secret(key_file)
    sys.stdout.write("service stopped\n")
    return 0
