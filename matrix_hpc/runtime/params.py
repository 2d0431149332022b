"""An agent's declared params: a dataclass ``Params`` on the class, checked before Ray starts.

Without a declaration ``self.params`` is the dict the config gives, and a typo in it
(``max_revision`` for ``max_revisions``) was silently ignored. With one, every key of
``workflow.roles.NAME.params`` must be a field of it (one line naming the role and the
key, with a "did you mean"), values are type-checked as the config's own keys are, and
``self.params`` is an instance with the declared defaults. ``workflow.params`` (shared by
every role) gives each declaring role the keys it declares; a shared key no role can
take is a mistake too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from ..config import ConfigError
from ..config.build import build

__all__ = ["build_params", "check_params", "declared"]


def declared(cls: Any) -> tuple[str, ...] | None:
    """The param names ``cls`` declares (its ``Params`` dataclass's fields); None: it declares none."""
    decl = getattr(cls, "Params", None)
    if decl is None:
        return None
    if not (isinstance(decl, type) and dataclasses.is_dataclass(decl)):
        raise ConfigError(f"{cls.__module__}.{cls.__qualname__}.Params: expected a dataclass, got {decl!r}")
    return tuple(f.name for f in dataclasses.fields(decl))


def _hint(key: str, names: Iterable[str]) -> str:
    import difflib  # here: an actor imports it only for a misspelt param

    names = sorted(names)
    close = difflib.get_close_matches(key, names, n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"its params: {', '.join(names)}" if names else "it declares none"


def build_params(cls: Any, params: Mapping[str, Any], key: str) -> Any:
    """``cls.Params`` built from the declared keys of ``params`` (shared keys it does not
    declare are another role's), type-checked; ``params`` itself when ``cls`` declares none."""
    names = declared(cls)
    if names is None:
        return params
    return build(cls.Params, {k: v for k, v in params.items() if k in names}, key)


def check_params(roles: Mapping[str, tuple[Any, Mapping[str, Any]]], shared: Mapping[str, Any]) -> None:
    """Check each role's params against its agent class (``roles``: name -> (class, the role's
    own params)) and the shared ``workflow.params``; raise :class:`ConfigError` at the first mistake."""
    takers: set[str] = set()
    free = False  # a role that declares nothing may read any shared key
    for role, (cls, own) in roles.items():
        names = declared(cls)
        if names is None:
            free = True
            continue
        key = f"workflow.roles.{role}.params"
        for k in own:
            if k not in names:
                raise ConfigError(f"{key}.{k}: role {role!r} ({cls.__name__}) declares no such param ({_hint(k, names)})")
        takers.update(names)
        build_params(cls, {**shared, **own}, key)  # the values' types, and required params
    if not free:
        for k in shared:
            if k not in takers:
                raise ConfigError(f"workflow.params.{k}: no role declares this param ({_hint(k, takers)})")
