"""Ray's token authentication for the clusters a run starts, and loopback binding for a local one.

Ray (2.52 on) authenticates every gRPC and HTTP request of its control plane with one
shared token when ``RAY_AUTH_MODE=token``; the token comes from ``RAY_AUTH_TOKEN``,
else the file at ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``. Every process of
the cluster reads it from its environment, which Ray's daemons and workers inherit. A
local run puts a fresh token in the driver's environment (so in no file); a Slurm run
points ``RAY_AUTH_TOKEN_PATH`` at a ``0600`` file in the job's directory
(``slurm/node.py``). Ray caches the mode and the token per process, so both are
refreshed here whenever they change (a test process may start several clusters).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..credentials import new_secret_file

__all__ = ["AUTH_ENV", "RayAuth", "loopback_only", "new_ray_token"]

log = logging.getLogger(__name__)

AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _refresh_ray() -> None:
    """Make this process's Ray see the environment's auth mode and token again (it reads
    them once; Ray's own ``_enable_token_auth`` does the same). Not loaded yet: it will read them."""
    if "ray._raylet" not in sys.modules:
        return
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


class RayAuth:
    """Token mode in this process's environment (and so in every Ray process it starts) until
    :meth:`restore` puts the previous variables back."""

    def __init__(self, token: str | None = None, token_path: str | os.PathLike[str] | None = None) -> None:
        if (token is None) == (token_path is None):
            raise ValueError("give a token or a token file, not both")
        self._saved = {k: os.environ.get(k) for k in AUTH_ENV}
        os.environ["RAY_AUTH_MODE"] = "token"
        # One source only: RAY_AUTH_TOKEN would win over the file (a user's shell may set it).
        for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            os.environ.pop(k, None)
        if token is not None:
            os.environ["RAY_AUTH_TOKEN"] = token
        else:
            os.environ["RAY_AUTH_TOKEN_PATH"] = str(Path(token_path).resolve())  # type: ignore[arg-type]
        _refresh_ray()

    def restore(self) -> None:
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        try:
            _refresh_ray()
        except Exception:  # never fail a shutdown over it
            log.debug("could not refresh Ray's auth settings", exc_info=True)


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """While a local cluster starts: its node address is 127.0.0.1, so the GCS, the raylet,
    the workers and the dashboard agent (gRPC, HTTP, metrics export) listen on loopback.

    Ray takes a node address of 127.0.0.1 only where multi-node clusters are off (macOS,
    Windows; ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``); elsewhere it rewrites 127.0.0.1 to the
    primary interface and its servers listen on every interface. The variable reaches the
    processes ``ray.init`` starts; this process reads it as a module constant (read at
    import), set here for the start only.
    """
    from ray._private import ray_constants

    var, old_env, old_const = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, None, ray_constants.ENABLE_RAY_CLUSTER
    old_env = os.environ.get(var)
    os.environ[var] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_const
        if old_env is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = old_env


def new_ray_token(path: Path, earlier: Iterable[Path]) -> Path:
    """Write a fresh token to ``path`` (0600; ``JobLayout.ray_token``) and remove ``earlier``,
    the tokens of the job's earlier lives (a killed life leaves its own)."""
    for old in earlier:
        if old != path:
            old.unlink(missing_ok=True)
    return new_secret_file(path)
