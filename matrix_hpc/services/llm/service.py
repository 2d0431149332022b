"""The LLM service of one run, as the driver sees it: build, start, inspect, stop.

Every backend goes through the same registry: ``embedded`` and ``vllm`` start
``llm.replicas`` managed replicas; ``external`` registers ``llm.base_urls``
(probed, never restarted). The API key is read from ``llm.api_key_env`` where it
is used and never written anywhere.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayError

from ...config import LLMConfig
from ...labels import on_driver_node
from .base import ServerStartError
from .registry import EndpointRegistry, registry_name
from .replica import ReplicaSpec

__all__ = ["LLMService", "replica_specs"]

log = logging.getLogger(__name__)


def replica_specs(llm: LLMConfig, log_dir: str | Path) -> list[ReplicaSpec]:
    if llm.engine == "external":
        return []
    if llm.engine == "embedded":
        settings, timeout = dataclasses.asdict(llm.embedded), llm.embedded.startup_timeout_s
    else:
        settings, timeout = dataclasses.asdict(llm.vllm), llm.vllm.startup_timeout_s
    return [ReplicaSpec(llm.engine, llm.model, str(log_dir), settings, timeout) for _ in range(llm.replicas)]


class LLMService:
    def __init__(self, llm: LLMConfig, run_id: str, namespace: str, log_dir: str | Path) -> None:
        self.config = llm
        self.name = registry_name(run_id)
        self.namespace = namespace
        specs = replica_specs(llm, log_dir)
        if llm.engine == "vllm":
            from .vllm import validate_vllm_args

            try:
                validate_vllm_args(llm.vllm.extra_args, llm.vllm.python or None)  # type: ignore[arg-type]
            except ValueError as exc:
                raise ServerStartError(f"llm.vllm.extra_args: {exc}") from None
        # On the driver's node: a worker node's death must not take the registry (and with it
        # the replacement of that node's replicas) along.
        self.registry = EndpointRegistry.options(name=self.name, namespace=namespace, max_concurrency=1000, **on_driver_node()).remote(
            run_id, namespace, specs, list(llm.base_urls), llm.model, llm.api_key_env,
            llm.health_interval_s, llm.health_failures, llm.max_restarts, max(llm.timeout_s, 10.0),
        )  # fmt: skip
        self.endpoints: list[dict[str, Any]] = []

    def start(self) -> list[str]:
        """Start the replicas and wait until each completes a real generation; returns the URLs."""
        try:
            self.endpoints = ray.get(self.registry.start.remote())
        except RayError as exc:
            cause = getattr(exc, "cause", None) or exc
            raise ServerStartError(f"LLM service did not start: {str(cause).strip().splitlines()[-1]}") from None
        return self.urls

    @property
    def urls(self) -> list[str]:
        return [e["url"] for e in self.endpoints]

    def status(self, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        self.endpoints = ray.get(self.registry.status.remote(), timeout=timeout_s)
        return self.endpoints

    def stop(self) -> None:
        try:
            ray.get(self.registry.stop.remote(), timeout=60)
        except RayError as exc:
            log.warning("LLM service stop: %s", exc)
