"""Options that several ``gw`` commands share, spelled once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def gateway_options(fn: F) -> F:
    """--gateway and --ca-file, as every command that dials the gateway takes them."""
    fn = click.option(
        "--ca-file",
        required=True,
        type=click.Path(path_type=Path, dir_okay=False),
        help="CA that signed the gateway's certificate.",
    )(fn)
    return click.option("--gateway", required=True, help="Gateway HOST:PORT.")(fn)


def login_options(fn: F) -> F:
    """--gateway, --ca-file and --user, for commands that log in."""
    fn = click.option("--user", required=True, help="Your user id at the gateway.")(fn)
    return gateway_options(fn)
