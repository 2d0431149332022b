"""Per-actor limits derived from ``run.max_in_flight``, so that setting it is enough.

Every task in flight may sit at one role at once, so by default each role's actors
together run ``max_in_flight`` tasks, and an LLM role's actor may keep as many
requests open (HTTP connections, up to :data:`MAX_CONNECTIONS` sockets per actor, and
requests per endpoint: a server that is full says so with 429/503, which the client
backs off from; tasks beyond the sockets wait their turn in order). A limit set explicitly is
kept; when it makes ``max_in_flight`` unreachable for a role, :func:`role_limits`
says which key caps it, so the caller can warn at start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["MAX_CONNECTIONS", "RoleLimits", "role_limits"]

MAX_CONNECTIONS = 4096
"""Derived sockets per actor stop here: file descriptors (often 1024-65536 per process) and
ephemeral ports (~28,000 per server address) run out long before 50,000, and no server
batches that many requests; more requests than this wait for a free one (O(1) each)."""


@dataclass(frozen=True)
class RoleLimits:
    concurrency: int
    """Tasks one actor of the role runs at once."""
    max_connections: int
    """HTTP connections of one actor's LLM client, over all its endpoints together."""
    max_outstanding_per_endpoint: int
    """Requests one actor keeps open against one endpoint."""
    reachable: int
    """Tasks the role's actors can run at once, each with an LLM request open (beyond
    :data:`MAX_CONNECTIONS` per actor, requests queue for a socket)."""
    warning: str | None = None
    """Set when ``reachable`` < ``max_in_flight``: which explicit key caps the role."""


def role_limits(
    role: str,
    max_in_flight: int,
    instances: int,
    concurrency: int | None = None,
    *,
    uses_llm: bool = True,
    endpoints: int = 1,
    max_connections: int | None = None,
    max_outstanding_per_endpoint: int | None = None,
    model_key: str = "llm",
) -> RoleLimits:
    """Fill the unset (None) limits of one role from ``max_in_flight`` and its ``instances``.

    ``endpoints`` is the number of LLM endpoints the role's model starts with;
    ``model_key`` is the config section its client settings come from (``llm`` or
    ``models.NAME``), used only to name keys in the warning.
    """
    share = math.ceil(max_in_flight / max(1, instances))
    conc = concurrency if concurrency is not None else share
    conns = max_connections if max_connections is not None else min(conc, MAX_CONNECTIONS)
    per_ep = max_outstanding_per_endpoint if max_outstanding_per_endpoint is not None else conns
    caps = [(conc, f"workflow.roles.{role}.concurrency={conc}", concurrency is not None)]
    if uses_llm and (max_connections is not None or conns == conc):  # the socket cap is by design
        caps.append((conns, f"{model_key}.max_connections={conns}", max_connections is not None))
        caps.append(
            (
                per_ep * max(1, endpoints),
                f"{model_key}.max_outstanding_per_endpoint={per_ep} × {endpoints} endpoint(s)",
                max_outstanding_per_endpoint is not None,
            )
        )
    per_actor, what, _ = min(caps, key=lambda c: c[0])
    reachable = per_actor * instances
    warning = None
    if reachable < max_in_flight:
        explicit = [w for n, w, set_ in caps if set_ and n == per_actor] or [what]
        warning = (
            f"run.max_in_flight={max_in_flight} is unreachable for role {role!r}: its {instances} actor(s) hold at most "
            f"{reachable} {'LLM requests' if uses_llm else 'tasks'} at once, capped by {explicit[0]} per actor (unset it to derive it)"
        )
    return RoleLimits(conc, conns, per_ep, reachable, warning)
