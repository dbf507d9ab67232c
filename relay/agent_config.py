"""The agent's config file: ``gw agent run --config FILE`` (TOML).

Every key is optional; a flag of ``gw agent run`` given on the command line wins over
the file's key (``--target`` and ``--gateway``, when given, replace the file's whole
list). Relative paths are relative to the file's folder. Without ``--config`` the
agent reads :data:`DEFAULT_PATH` (or the file ``$GW_AGENT_CONFIG`` names) when it
exists, and runs on flags alone when it does not::

    state_dir = "/var/lib/gw-agent"             # keys, certificate, CA (gw agent enroll)
    # Every node of the gateway; a name may resolve to several addresses, each a node.
    # Default: the address the agent enrolled with.
    gateways = ["gw1.example.org:8443", "gw2.example.org:8443"]
    approval_command = "/usr/local/bin/ask-approval"
    prompt = true                               # false: never ask on this terminal

    [targets]                                   # the only services reachable here
    rdp = "127.0.0.1:3389"

    [reconnect]                                 # full-jitter backoff, in seconds
    first = 1.0                                 # the first wait is at most this
    max = 60.0                                  # no wait is longer than this

A file that is not valid TOML, an unknown key and a value of the wrong kind are each
one :class:`AgentConfigError` naming the file, the line or the key, and what is
expected.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import message as m
from .errors import GatewayError


def _default_path() -> Path:
    if sys.platform == "win32":
        return Path(os.environ.get("PROGRAMDATA", r"C:\ProgramData")) / "gw-agent" / "agent.toml"
    return Path("/etc/gw-agent/agent.toml")


#: Where ``gw agent run`` looks for its config when ``--config`` is not given.
DEFAULT_PATH = _default_path()
#: An environment variable that names another default file.
ENV_VAR = "GW_AGENT_CONFIG"

#: Bounds of the reconnect waits, seconds. Under 50 ms a dead gateway would be dialled
#: in a tight loop; over a day an agent would look lost for good.
MIN_WAIT, MAX_WAIT = 0.05, 86400.0


class AgentConfigError(GatewayError):
    """The agent's config file is wrong: where, and what is expected."""


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """What the file says; None (or empty) where it says nothing."""

    path: Path
    """The file read."""
    state_dir: Path | None = None
    """The enrolled agent's folder (keys, certificate, CA)."""
    gateways: tuple[str, ...] = ()
    """The gateway's nodes, ``HOST:PORT`` each; empty: the enrollment's address."""
    targets: tuple[tuple[str, str, int], ...] = ()
    """(name, host, port) of each local service exposed."""
    approval_command: str | None = None
    """Run for each approval request; exit status 0 approves."""
    prompt: bool = True
    """Ask approvals on the terminal the agent runs in, when it has one."""
    backoff_first: float = 1.0
    """The first reconnect wait is drawn from [0, this), seconds."""
    backoff_max: float = 60.0
    """No reconnect wait is longer than this, seconds."""


def default_path() -> Path:
    """``$GW_AGENT_CONFIG``, else :data:`DEFAULT_PATH`."""
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else DEFAULT_PATH


def load(path: Path) -> AgentConfig:
    """Read and check the file; AgentConfigError says what is wrong, and where."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AgentConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return parse(data, path)


def parse(data: bytes, path: Path) -> AgentConfig:
    import tomllib  # only when there is a file: gw agent run with flags alone never needs it

    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise AgentConfigError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        # tomllib's text ends with "(at line N, column M)".
        raise AgentConfigError(f"{path}: not valid TOML: {exc}") from exc

    text = data.decode("utf-8")

    def error(key: str, what: str) -> AgentConfigError:
        line = _line_of(text, key)
        where = f"{path} line {line}" if line else str(path)
        return AgentConfigError(f"{where}: {key}: {what}")

    known = {"state_dir", "gateways", "targets", "approval_command", "prompt", "reconnect"}
    for key in doc:
        if key not in known:
            raise error(key, f"unknown key (known: {', '.join(sorted(known))})")
    base = path.parent

    state_dir = None
    if "state_dir" in doc:
        value = doc["state_dir"]
        if not isinstance(value, str) or not value:
            raise error("state_dir", "expected a folder path (a non-empty string)")
        state_dir = Path(value).expanduser()
        state_dir = state_dir if state_dir.is_absolute() else base / state_dir

    gateways: list[str] = []
    value = doc.get("gateways", [])
    if not isinstance(value, list) or ("gateways" in doc and not value):
        raise error("gateways", 'expected a non-empty list of "HOST:PORT" strings')
    for i, entry in enumerate(value):
        if not isinstance(entry, str):
            raise error(f"gateways[{i}]", f'expected "HOST:PORT", got {type(entry).__name__}')
        _hostport(entry, error, f"gateways[{i}]")
        gateways.append(entry)

    targets: list[tuple[str, str, int]] = []
    table = doc.get("targets", {})
    if not isinstance(table, Mapping):
        raise error("targets", 'expected a table of NAME = "HOST:PORT"')
    for name, entry in table.items():
        key = f"targets.{name}"
        if not m.valid_id(name):
            raise error(key, "a target name is letters, digits, . _ - only")
        if not isinstance(entry, str):
            raise error(key, f'expected "HOST:PORT", got {type(entry).__name__}')
        targets.append((name, *_hostport(entry, error, key)))

    command = doc.get("approval_command")
    if command is not None and (not isinstance(command, str) or not command.strip()):
        raise error("approval_command", "expected a command line (a non-empty string)")
    prompt = doc.get("prompt", True)
    if not isinstance(prompt, bool):
        raise error("prompt", "expected true or false")

    first, cap = 1.0, 60.0
    recon = doc.get("reconnect", {})
    if not isinstance(recon, Mapping):
        raise error("reconnect", "expected a table with first and max (seconds)")
    for key in recon:
        if key not in ("first", "max"):
            raise error(f"reconnect.{key}", "unknown key (known: first, max)")
    first = _seconds(recon, "first", first, error)
    cap = _seconds(recon, "max", cap, error)
    if cap < first:
        raise error("reconnect.max", f"must be at least reconnect.first ({first:g})")

    return AgentConfig(
        path=path,
        state_dir=state_dir,
        gateways=tuple(gateways),
        targets=tuple(targets),
        approval_command=command,
        prompt=prompt,
        backoff_first=first,
        backoff_max=cap,
    )


def _hostport(value: str, error: Any, key: str) -> tuple[str, int]:
    from .text import parse_hostport

    try:
        return parse_hostport(value)
    except GatewayError as exc:
        raise error(key, str(exc)) from exc


def _seconds(table: Mapping[str, Any], key: str, default: float, error: Any) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"reconnect.{key}", "expected a number of seconds")
    if not MIN_WAIT <= value <= MAX_WAIT:
        raise error(f"reconnect.{key}", f"must be between {MIN_WAIT:g} and {MAX_WAIT:g} seconds")
    return float(value)


def _line_of(text: str, key: str) -> int | None:
    """The line where ``key`` (``name``, ``table.name``, ``name[i]``) is set, if it
    can be told from the text (for the error message only)."""
    path = key.split("[")[0].split(".")
    table, name = (path[0], path[-1]) if len(path) > 1 else ("", path[0])
    current = ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("[") and not line.startswith("[["):
            current = line.split("#")[0].strip("[] ")
            continue
        left, sep, _ = line.partition("=")
        if sep and current == table and left.strip().strip("\"'") == name:
            return number
    return None
