"""What every actor of a run is built from: the team spec, typed, sent once to each actor.

One :class:`ClientSpec` per model (its endpoints, its registry, its client limits),
one :class:`RoleSpec` per role (its agent class, its model, its sampling, and its
per-actor limits, derived from ``run.max_in_flight`` where unset: runtime.limits).
Built from the job config by :func:`team_spec`; nothing here is read back by key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import JobConfig, ModelConfig, PoolConfig, Sampling, resolve_sampling
from ..config.checks import model_key
from .agent import uses_llm
from .limits import role_limits
from .loader import load_object

__all__ = ["ClientSpec", "RoleSpec", "TeamSpec", "team_spec"]


@dataclass(frozen=True)
class ClientSpec:
    """How an agent actor calls one model: where (``urls``, kept current by ``registry``) and how."""

    name: str
    """The model's key in ``models``."""
    served_name: str
    """What requests ask for."""
    urls: list[str]
    registry: str | None = None
    """Name of the model's :class:`EndpointRegistry` actor; clients follow its routable set."""
    api_key_env: str | None = None
    api_key_file: str | None = None
    """The run's key for its managed servers: a 0600 file each actor reads (the path travels, never the key)."""
    timeout_s: float = 120.0
    max_retries: int = 3
    retry_backoff_s: float = 1.0
    sticky: bool = True
    # Connection and per-endpoint limits are per role (RoleSpec): derived from run.max_in_flight.

    @classmethod
    def from_model(cls, name: str, m: ModelConfig, urls: list[str], registry: str | None, api_key_file: str | None = None) -> ClientSpec:
        return cls(
            name=name, served_name=m.served_name, urls=list(urls), registry=registry, api_key_env=m.api_key_env,
            api_key_file=api_key_file if m.engine != "external" else None,
            timeout_s=m.timeout_s, max_retries=m.max_retries, retry_backoff_s=m.retry_backoff_s, sticky=m.sticky,
        )  # fmt: skip


@dataclass(frozen=True)
class RoleSpec:
    agent: str
    instances: int
    concurrency: int
    params: dict[str, Any] = field(default_factory=dict)
    inline: bool = False
    model: str | None = None
    """The key in :attr:`TeamSpec.models` this role calls (None: it calls no LLM)."""
    sampling: Sampling = field(default_factory=Sampling)
    max_connections: int = 64
    """HTTP connections of one actor's client (its model's setting, else derived)."""
    max_outstanding: int = 64
    """Requests one actor keeps open against one endpoint (its model's setting, else derived)."""


@dataclass(frozen=True)
class TeamSpec:
    """Everything an actor needs to find its peers and call its role's model."""

    run_id: str
    namespace: str
    roles: dict[str, RoleSpec]
    models: dict[str, ClientSpec] = field(default_factory=dict)
    batch_size: int = 64
    batch_wait_s: float = 0.02
    sandbox: PoolConfig | None = None
    metrics: bool = True
    """Export Prometheus metrics (``run.metrics``; see matrix_hpc.metrics)."""
    agent_placement: str = "spread"
    """``run.agent_placement``: ``spread`` (a role's instances over the nodes) or ``pack``."""
    loop_lag_warn_s: float = 0.5
    """Warn when an actor's event loop stalls this long (a blocking step); 0 turns it off."""
    journal_dir: str | None = None
    """Where completed LLM calls are journaled for replay (``run.replay``); None: off."""
    journal_fsync: bool = True
    journal_compact_s: float = 30.0
    """Seconds between compactions of an actor's journal (entries of committed tasks dropped)."""
    agents_log: str | None = None
    """The file agent exceptions' full tracebacks go to (``RunLayout.agents_log``); None: the actor's log."""
    entry: str = ""
    """The role new tasks start in (``workflow.entry``)."""

    def has_actors(self, role: str) -> bool:
        """Whether ``role`` gets actors of its own: an inline role runs in the actors that hand
        it a task and is never sent one, unless it is the entry (the driver sends it new tasks)."""
        return role == self.entry or not self.roles[role].inline

    def sets_up_inline_roles(self, role: str, index: int) -> bool:
        """Whether this actor builds and sets up every inline role at the run's start: the
        entry's first instance does, so a broken inline role stops the run before any task, as
        the setup of any role's agent does; the others build theirs at first use."""
        return index == 0 and role == self.entry


def _uses_llm(agent: str) -> bool:
    """:func:`~matrix_hpc.runtime.agent.uses_llm` of the class at path ``agent``; True when it does not load."""
    try:
        return uses_llm(load_object(agent))
    except ImportError:  # Team reports it, naming the key
        return True


def team_spec(
    config: JobConfig,
    run_id: str,
    namespace: str,
    endpoints: dict[str, tuple[list[str], str | None]],
    journal_dir: str | None = None,
    warn: Callable[[str], None] | None = None,
    agents_log: str | None = None,
    api_key_file: str | None = None,
) -> TeamSpec:
    """The team of ``config``; ``endpoints``: per model key, its URLs at start and its registry's name;
    ``journal_dir``: the run's call journal when ``run.replay`` is on; ``api_key_file``: the key
    of the run's managed LLM servers.

    ``warn`` hears, once per role, which explicit limit keeps ``run.max_in_flight`` out of reach.
    """
    wf = config.workflow
    roles = {}
    for name, r in wf.roles.items():
        model = config.role_model(name)
        m = config.models.get(model) if model else None
        lim = role_limits(
            name, config.run.max_in_flight, r.instances, r.concurrency, uses_llm=m is not None and _uses_llm(r.agent),
            endpoints=len(endpoints.get(model, ([], None))[0]) if model else 1,
            max_connections=m.max_connections if m else None, max_outstanding_per_endpoint=m.max_outstanding_per_endpoint if m else None,
            model_key=model_key(config, model) if model else "llm",
        )  # fmt: skip
        if lim.warning and warn is not None and not r.inline:  # an inline role runs in its callers' workers
            warn(lim.warning)
        roles[name] = RoleSpec(
            agent=r.agent, instances=r.instances, concurrency=lim.concurrency, params={**wf.params, **r.params}, inline=r.inline,
            model=model, sampling=resolve_sampling(m, r.sampling),
            max_connections=lim.max_connections, max_outstanding=lim.max_outstanding_per_endpoint,
        )  # fmt: skip
    models = {name: ClientSpec.from_model(name, m, *endpoints.get(name, ([], None)), api_key_file) for name, m in config.models.items()}
    return TeamSpec(
        run_id=run_id, namespace=namespace, roles=roles, models=models, batch_size=config.run.batch_size,
        batch_wait_s=config.run.batch_wait_ms / 1000.0, sandbox=config.sandbox, metrics=config.run.metrics,
        agent_placement=config.run.agent_placement,
        loop_lag_warn_s=config.run.loop_lag_warn_s,
        journal_dir=journal_dir, journal_fsync=config.output.fsync, journal_compact_s=config.run.replay_compact_s,
        agents_log=agents_log, entry=wf.entry,
    )  # fmt: skip
