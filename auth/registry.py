"""Find factors by name: the built-in ones and the ``gatewayd.auth_factors`` entry points.

A site adds a factor without forking by publishing a package with::

    [project.entry-points."gatewayd.auth_factors"]
    myfactor = "mypackage.factor:FACTOR"

where ``FACTOR`` is an :class:`auth.base.Factor`.
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import entry_points

from relay.errors import ConfigError

from .base import Factor

ENTRY_POINT_GROUP = "gatewayd.auth_factors"

#: Built-in factors: name -> "module:attribute". Imported lazily so that a factor whose
#: optional dependency is missing (pyscard, fido2) only fails when it is used.
BUILTIN = {
    "password": "auth.password:FACTOR",
    "totp": "auth.totp:FACTOR",
    "smartcard": "auth.smartcard:FACTOR",
    "fido2": "auth.fido2:FACTOR",
}


def _load(ref: str) -> Factor:
    module, _, attr = ref.partition(":")
    factor = getattr(importlib.import_module(module), attr)
    if not isinstance(factor, Factor):
        raise TypeError(f"{ref} is not an auth.base.Factor")
    return factor


def names() -> list[str]:
    """Every factor name known here, built-in first."""
    extra = [ep.name for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in BUILTIN]
    return [*BUILTIN, *sorted(extra)]


def get(name: str) -> Factor:
    """The factor called ``name``; ConfigError if there is none or it cannot load."""
    ref = BUILTIN.get(name)
    try:
        if ref is not None:
            return _load(ref)
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == name:
                factor = ep.load()
                if not isinstance(factor, Factor):
                    raise TypeError(f"entry point {ep.value} is not an auth.base.Factor")
                return factor
    except (ImportError, AttributeError, TypeError) as exc:
        raise ConfigError("", f"auth factor {name!r} cannot be loaded: {exc}") from exc
    raise ConfigError("", f"unknown auth factor {name!r} (known: {', '.join(names())})")


def reload() -> None:
    """Tell every loaded built-in factor to re-read its files (CRLs, anchors) on SIGHUP."""
    for ref in BUILTIN.values():
        module = sys.modules.get(ref.partition(":")[0])
        hook = getattr(module, "reload", None)
        if callable(hook):
            hook()
