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

from .base import probe_generation

__all__ = ["check_health", "find_endpoints"]

log = logging.getLogger(__name__)


def _from_output(folder: Path) -> tuple[list[str], str | None]:
    """Endpoints recorded by ``run`` (run.json) or ``serve`` (services.json), newest first."""
    files = [f for f in (folder / "services.json", folder / "run.json") if f.is_file()]
    for f in sorted(files, key=lambda f: f.stat().st_mtime, reverse=True):
        data = json.loads(f.read_text())
        urls = [e["url"] for e in data.get("llm") or [] if e.get("url")]
        if urls:
            model = data.get("model") or (data.get("config") or {}).get("llm", {}).get("model")
            return urls, model
    return [], None


def find_endpoints(target: str | None) -> tuple[list[str], str | None]:
    """The endpoints named by an output folder or a job YAML (its external URLs, or its output's record)."""
    if not target:
        return [], None
    path = Path(target)
    if path.is_dir():
        return _from_output(path)
    from ...config import load_config

    config = load_config(path)
    if config.llm.engine == "external":
        return list(config.llm.base_urls), config.llm.model
    urls, model = _from_output(Path(config.output.path).expanduser())
    return urls, model or config.llm.model


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
    found, found_model = find_endpoints(target)
    urls = [u.rstrip("/") for u in urls] + found
    if not urls:
        print("matrix-hpc: no endpoints to probe (give an output folder of a run or serve, a config, or --url)", file=sys.stderr)
        return 1
    model = model or found_model or "default"

    def probe(url: str) -> tuple[str, bool, float, str]:
        t0 = time.monotonic()
        served = served_models(url, timeout_s, api_key)
        if served is not None and model not in served:
            # Some servers (llama.cpp) answer for any model name: the listing is the truth.
            return url, False, time.monotonic() - t0, f"; model {model} is not served here (it serves: {', '.join(served) or 'nothing'})"
        return url, probe_generation(url, model, timeout_s, api_key), time.monotonic() - t0, ""

    with ThreadPoolExecutor(max_workers=min(16, len(urls))) as pool:
        results = list(pool.map(probe, urls))
    for url, ok, secs, why in results:
        print(f"{'ok  ' if ok else 'FAIL'}  {url}  ({secs:.2f}s, model {model}{why})")
    bad = sum(not ok for _, ok, _, _ in results)
    print(f"{len(results) - bad}/{len(results)} endpoints generate")
    return 0 if bad == 0 else 1
