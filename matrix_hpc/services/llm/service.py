"""The LLM services of one run, as the driver sees them: one per model; build, start, inspect, stop.

Each model has its own registry, replicas, health checks and restarts, so a
failing model never takes another's endpoints out of routing. ``embedded`` and
``vllm`` models start ``replicas`` managed replicas; ``external`` ones register
``base_urls`` (probed, never restarted). External endpoints' API keys are read from
``api_key_env`` where they are used and never written anywhere; managed servers take the
run's own key, which travels as the path of a 0600 file (``api_key_file``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import ray
from ray.exceptions import RayError

from ...config import ModelConfig
from ...labels import on_driver_node
from .base import ServerStartError
from .registry import EndpointRegistry, registry_name
from .replica import ReplicaSpec
from .status import EndpointStatus

__all__ = ["LLMService", "LLMServices", "replica_specs"]

log = logging.getLogger(__name__)


def replica_specs(name: str, m: ModelConfig, log_dir: str | Path, api_key_file: str | None = None) -> list[ReplicaSpec]:
    if m.engine == "external":
        return []
    settings = m.embedded if m.engine == "embedded" else m.vllm
    return [
        ReplicaSpec(m.engine, m.served_name, str(log_dir), settings, settings.startup_timeout_s, model_key=name, gpus=m.replica_gpus, api_key_file=api_key_file)
        for _ in range(m.replicas)
    ]


def _cause(exc: RayError) -> str:
    cause = getattr(exc, "cause", None) or exc
    return str(cause).strip().splitlines()[-1]


class LLMService:
    """One model's registry (which starts and supervises its replicas)."""

    def __init__(
        self, name: str, m: ModelConfig, run_id: str, namespace: str, log_dir: str | Path, key: str = "llm", api_key_file: str | None = None,
    ) -> None:  # fmt: skip
        """``api_key_file``: the run's key for managed servers (an external model keeps its ``api_key_env``)."""
        self.name, self.config, self.key = name, m, key
        api_key_file = api_key_file if m.engine != "external" else None
        self.registry_name = registry_name(run_id, name)
        if m.engine == "vllm":
            from .vllm import validate_vllm_args

            try:
                validate_vllm_args(m.vllm.extra_args, m.vllm.python or None)  # type: ignore[arg-type]
            except ValueError as exc:
                raise ServerStartError(f"{key}.vllm.extra_args: {exc}") from None
        # On the driver's node: a worker node's death must not take the registry (and with it
        # the replacement of that node's replicas) along.
        self.registry = EndpointRegistry.options(name=self.registry_name, namespace=namespace, max_concurrency=1000, **on_driver_node()).remote(
            run_id, namespace, name, replica_specs(name, m, log_dir, api_key_file), list(m.base_urls), m.served_name, m.api_key_env,
            m.health_interval_s, m.health_failures, m.max_restarts, m.health_timeout_s or max(m.timeout_s, 10.0), api_key_file,
        )  # fmt: skip
        self.endpoints: list[EndpointStatus] = []

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self.endpoints]


class LLMServices:
    """Every model of a run: started together, inspected and stopped together."""

    def __init__(
        self, models: dict[str, ModelConfig], run_id: str, namespace: str, log_dir: str | Path, keys: dict[str, str] | None = None,
        api_key_file: str | None = None,
    ) -> None:  # fmt: skip
        self.services: dict[str, LLMService] = {}
        for name, m in models.items():
            self.services[name] = LLMService(name, m, run_id, namespace, log_dir, (keys or {}).get(name, f"models.{name}"), api_key_file)

    def place(self, timeout_s: float = 120.0) -> None:
        """Place every managed replica, models with bigger replicas first.

        Ray places an actor on the first node with room, so small replicas created first
        could split the GPUs of every node and leave none whole for a tensor-parallel one;
        placing the biggest first (first fit decreasing) avoids that in the common cases.
        """
        tiers = sorted({svc.config.replica_gpus for svc in self.services.values() if svc.config.engine != "external"}, reverse=True)
        for gpus in tiers:
            refs = {
                name: svc.registry.place.remote(timeout_s)
                for name, svc in self.services.items()
                if svc.config.engine != "external" and svc.config.replica_gpus == gpus
            }
            for name, ref in refs.items():
                try:
                    hosts = ray.get(ref)
                except RayError as exc:
                    raise ServerStartError(f"LLM service of model {name!r} could not be placed: {_cause(exc)}") from None
                log.info("model %s: %d replica(s) placed on %s", name, len(hosts), ", ".join(hosts))

    def start(self) -> dict[str, list[str]]:
        """Place every model's replicas, start them (all at once) and wait until each generates; URLs per model."""
        self.place()
        refs = {name: svc.registry.start.remote() for name, svc in self.services.items()}
        for name, ref in refs.items():
            try:
                self.services[name].endpoints = ray.get(ref)
            except RayError as exc:
                raise ServerStartError(f"LLM service of model {name!r} did not start: {_cause(exc)}") from None
        return {name: svc.urls for name, svc in self.services.items()}

    @property
    def endpoints(self) -> list[EndpointStatus]:
        return [e for svc in self.services.values() for e in svc.endpoints]

    def client_endpoints(self) -> dict[str, tuple[list[str], str | None]]:
        """Per model: its routable URLs now (an external endpoint that failed its start-up
        probe is not, until the registry lists it) and its registry's name (what agent
        clients follow)."""
        return {name: ([e.url for e in svc.endpoints if e.state == "up"], svc.registry_name) for name, svc in self.services.items()}

    def status(self, timeout_s: float = 10.0) -> list[EndpointStatus]:
        refs = {name: svc.registry.status.remote() for name, svc in self.services.items()}
        for name, ref in refs.items():
            self.services[name].endpoints = ray.get(ref, timeout=timeout_s)
        return self.endpoints

    def stop(self) -> None:
        refs = [svc.registry.stop.remote() for svc in self.services.values()]
        for ref in refs:
            try:
                ray.get(ref, timeout=60)
            except RayError as exc:
                log.warning("LLM service stop: %s", exc)
