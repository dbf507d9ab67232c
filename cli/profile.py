"""The client profile: what a person would otherwise type on every ``gw`` command.

``~/.config/gw/config.toml`` (``$XDG_CONFIG_HOME/gw``; ``%APPDATA%\\gw`` on Windows)::

    gateway = "gw.example.org:8443"
    ca_file = "ca.pem"            # relative to this file's folder; ~ is expanded
    user = "alice"
    mode = "access"

Each value is taken from the command's flag first, then from its environment variable
(``GW_GATEWAY``, ``GW_CA_FILE``, ``GW_USER``, ``GW_MODE``), then from the profile. A bad
profile is one line naming the file, the line and the key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from .common import EXIT_LOCAL, config_home, fail

F = TypeVar("F", bound=Callable[..., Any])

#: The profile's keys and what each holds.
KEYS = {
    "gateway": "the gateway's HOST:PORT",
    "ca_file": "the CA file that signed the gateway's certificate",
    "user": "your user id at the gateway",
    "mode": "access, support or homeoffice",
}
MODES = ("access", "support", "homeoffice")
#: Where each value comes from when the flag is not given.
ENV = {"gateway": "GW_GATEWAY", "ca_file": "GW_CA_FILE", "user": "GW_USER", "mode": "GW_MODE"}


@dataclass(frozen=True, slots=True)
class Profile:
    path: Path
    values: dict[str, str]

    def get(self, key: str) -> str | None:
        return self.values.get(key)


def profile_path() -> Path:
    return config_home() / "config.toml"


def _line_of(text: str, key: str) -> int:
    pattern = re.compile(rf"^[ \t]*{re.escape(key)}[ \t]*=", re.MULTILINE)
    found = pattern.search(text)
    return text.count("\n", 0, found.start()) + 1 if found else 0


def load(path: Path | None = None) -> Profile:
    """The profile (empty when there is none); one-line failure (exit 4) when it is bad."""
    path = path or profile_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Profile(path, {})
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read the profile {path}: {exc}", EXIT_LOCAL)
    import tomllib  # only when there is a profile to read

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        fail(f"{path}: not valid TOML: {exc}", EXIT_LOCAL)
    values: dict[str, str] = {}
    for key, value in data.items():
        where = f"{path} line {_line_of(text, key)}"
        if key not in KEYS:
            import difflib

            near = difflib.get_close_matches(key, KEYS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f" (known: {', '.join(KEYS)})"
            fail(f"{where}: unknown key {key!r}{hint}", EXIT_LOCAL)
        if not isinstance(value, str) or not value.strip():
            fail(f"{where}: {key} must be a non-empty string ({KEYS[key]})", EXIT_LOCAL)
        if key == "mode" and value not in MODES:
            fail(f"{where}: mode must be one of {', '.join(MODES)}, not {value!r}", EXIT_LOCAL)
        if key == "ca_file":
            value = str(path.parent / Path(value).expanduser())
        values[key] = value
    return Profile(path, values)


class Resolved:
    """Flag > environment > profile, for one command; the profile is read only if needed."""

    def __init__(self) -> None:
        self._profile: Profile | None = None

    @property
    def profile(self) -> Profile:
        if self._profile is None:
            self._profile = load()
        return self._profile

    def value(self, key: str, given: str | None, *, required: bool = True) -> str | None:
        if given:
            return given
        env = os.environ.get(ENV[key])
        if env:
            return env
        found = self.profile.get(key)
        if found is None and required:
            raise click.UsageError(
                f"Missing option '--{key.replace('_', '-')}' "
                f"(or {ENV[key]}, or {key} in {self.profile.path})"
            )
        return found


def profile_options(fn: F) -> F:
    """--gateway, --ca-file and --user, each defaulting to its variable, then the profile."""
    fn = click.option(
        "--user", default=None, help="Your user id at the gateway [env GW_USER; profile]."
    )(fn)
    fn = click.option(
        "--ca-file",
        default=None,
        type=click.Path(path_type=Path, dir_okay=False),
        help="CA that signed the gateway's certificate [env GW_CA_FILE; profile].",
    )(fn)
    return click.option(
        "--gateway", default=None, help="Gateway HOST:PORT [env GW_GATEWAY; profile]."
    )(fn)


def client_target(
    gateway: str | None, ca_file: Path | None, user: str | None
) -> tuple[Resolved, str, Path, str]:
    """The gateway, CA file and user of a command, each from flag, environment or profile."""
    r = Resolved()
    gw = r.value("gateway", gateway)
    ca = r.value("ca_file", str(ca_file) if ca_file else None)
    who = r.value("user", user)
    assert gw is not None and ca is not None and who is not None
    return r, gw, Path(ca), who
