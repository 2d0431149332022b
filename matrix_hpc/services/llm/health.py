"""``matrix-hpc check-health``: probe endpoints with a real generation and report."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ...credentials import read_secret
from ...store.layout import RunLayout
from .base import probe_generation
from .status import EndpointStatus

__all__ = ["check_health", "find_endpoints"]

log = logging.getLogger(__name__)


Endpoint = tuple[str, str, str | None]
"""(url, served model, the file holding its key: the run's managed servers take one)."""


def _from_output(folder: Path) -> list[Endpoint]:
    """Endpoints recorded by ``run`` (run.json) or ``serve`` (services.json), newest file first."""
    layout = RunLayout(folder)
    files = [f for f in (layout.services_json, layout.run_json) if f.is_file()]
    for f in sorted(files, key=lambda f: f.stat().st_mtime, reverse=True):
        data = json.loads(f.read_text())
        found = [EndpointStatus.from_dict(e) for e in data.get("llm") or []]
        pairs = [(e.url, e.served_model or e.model, e.api_key_file) for e in found if e.url]
        if pairs:
            return pairs
    return []


def find_endpoints(target: str | None) -> list[Endpoint]:
    """Every endpoint named by an output folder or a job YAML (its external models' URLs, and
    its output's record of the managed ones)."""
    if not target:
        return []
    path = Path(target)
    if path.is_dir():
        return _from_output(path)
    from ...config import load_config

    config = load_config(path)
    external: list[Endpoint] = [(u.rstrip("/"), m.served_name, None) for m in config.models.values() if m.engine == "external" for u in m.base_urls]
    managed = [e for e in _from_output(Path(config.output.path).expanduser()) if e[0] not in {u for u, _, _ in external}]
    return external + managed


def _key(key_file: str | None, default: str | None) -> str | None:
    """The key in ``key_file`` (a managed endpoint's), else ``default`` (``--api-key-env``'s).
    A key file that is gone (its run ended) gives no key: the probe then says 401."""
    if key_file:
        try:
            return read_secret(key_file)
        except (OSError, ValueError) as exc:
            log.warning("API key file %s: %s", key_file, exc)
    return default


def served_models(base_url: str, timeout_s: float, api_key: str | None = None) -> list[str] | None:
    """The model ids ``GET /models`` lists, or None where the server has no such listing."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{base_url}/models", headers=headers), timeout=timeout_s) as resp:
            data = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list):
        return None
    return [str(m.get("id")) for m in items if isinstance(m, dict) and m.get("id")]


def check_health(target: str | None, urls: list[str], model: str | None, timeout_s: float, api_key_env: str | None = None) -> int:
    """Print one line per endpoint; 0 when every endpoint generates, else 1."""
    api_key = os.environ.get(api_key_env) if api_key_env else None
    found = find_endpoints(target)
    pairs: list[Endpoint] = [(u.rstrip("/"), model or "default", None) for u in urls] + [(u, model or m, f) for u, m, f in found]
    if not pairs:
        print("matrix-hpc: no endpoints to probe (give an output folder of a run or serve, a config, or --url)", file=sys.stderr)
        return 1

    def probe(pair: Endpoint) -> tuple[str, str, bool, float, str]:
        url, name, key_file = pair
        key = _key(key_file, api_key)
        t0 = time.monotonic()
        served = served_models(url, timeout_s, key)
        if served is not None and name not in served:
            # Some servers (llama.cpp) answer for any model name: the listing is the truth.
            return url, name, False, time.monotonic() - t0, f"; model {name} is not served here (it serves: {', '.join(served) or 'nothing'})"
        return url, name, probe_generation(url, name, timeout_s, key), time.monotonic() - t0, ""

    with ThreadPoolExecutor(max_workers=min(16, len(pairs))) as pool:
        results = list(pool.map(probe, pairs))
    for url, name, ok, secs, why in results:
        print(f"{'ok  ' if ok else 'FAIL'}  {url}  ({secs:.2f}s, model {name}{why})")
    bad = sum(not ok for _, _, ok, _, _ in results)
    print(f"{len(results) - bad}/{len(results)} endpoints generate")
    return 0 if bad == 0 else 1
