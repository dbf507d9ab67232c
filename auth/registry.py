"""Find factors by name: every factor, built-in or not, is a ``gatewayd.auth_factors`` entry point.

gatewayd's own factors are registered in its pyproject.toml like any other; a site
adds a factor without forking by publishing a package with::

    [project.entry-points."gatewayd.auth_factors"]
    myfactor = "mypackage.factor:FACTOR"

where ``FACTOR`` is an :class:`auth.base.Factor`. Entry points are imported when a
factor is first used, so that one whose dependency is missing (pyscard, fido2), or a
broken plug-in, only fails where it is needed, with its name and what failed: the
daemon logs it and keeps serving the modes that do not need it, and ``gatewayd
check-config`` fails on it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from relay.errors import ConfigError

from .base import Factor

ENTRY_POINT_GROUP = "gatewayd.auth_factors"

#: gatewayd's own factors (registered in its pyproject.toml), listed first.
BUILTIN = ("password", "totp", "smartcard", "fido2")

_loaded: dict[str, Factor] = {}
_lock = threading.Lock()


def _entry_points() -> dict[str, list[EntryPoint]]:
    found: dict[str, list[EntryPoint]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, []).append(ep)
    return found


def names() -> list[str]:
    """Every registered factor name, gatewayd's own first."""
    found = _entry_points()
    return [*(n for n in BUILTIN if n in found), *sorted(n for n in found if n not in BUILTIN)]


def _where(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    name = getattr(dist, "name", None) if dist is not None else None
    return f"{ep.value} from {name}" if name else ep.value


def get(name: str) -> Factor:
    """The factor called ``name``; ConfigError, naming it and what failed, if it cannot load."""
    with _lock:
        factor = _loaded.get(name)
    if factor is not None:
        return factor
    candidates = _entry_points().get(name, [])
    if not candidates:
        known = names()
        hint = ""
        if not set(BUILTIN) <= set(known):
            hint = (
                "; gatewayd's own entry points are missing: install it "
                "(pip install -e . in the source tree)"
            )
        raise ConfigError(
            "", f"unknown auth factor {name!r} (known: {', '.join(known) or 'none'}){hint}"
        )
    if len({ep.value for ep in candidates}) > 1:
        # A second package claiming a name (say "password") must not silently take it over.
        where = " and ".join(_where(ep) for ep in candidates)
        raise ConfigError("", f"auth factor {name!r} is registered twice: {where}")
    ep = candidates[0]
    try:
        loaded = ep.load()
    except Exception as exc:  # a plug-in's import may fail any way; the daemon stays up
        raise ConfigError(
            "", f"auth factor {name!r} ({_where(ep)}) cannot be loaded: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(loaded, Factor):
        raise ConfigError(
            "",
            f"auth factor {name!r} ({_where(ep)}) is a {type(loaded).__name__}, "
            "not an auth.base.Factor",
        )
    if loaded.name != name:
        raise ConfigError("", f"auth factor {name!r} ({_where(ep)}) calls itself {loaded.name!r}")
    with _lock:
        return _loaded.setdefault(name, loaded)


def reload(settings: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """SIGHUP: call the reload hook of every loaded factor with its new ``[auth.<name>]``.

    Returns one line per hook that failed (the factor's name and the error); the others
    still ran.
    """
    with _lock:
        loaded = dict(_loaded)
    failed = []
    for name, factor in loaded.items():
        if factor.reload is None:
            continue
        try:
            factor.reload(settings.get(name, {}))
        except Exception as exc:  # a plug-in's bug must not stop the reload
            failed.append(f"auth factor {name!r}: reload failed: {type(exc).__name__}: {exc}")
    return failed
