"""What every admin operation is given and may raise; the checks of its arguments.

An operation is an ``async`` function ``(admin, args, by) -> result``: ``admin`` is
the :class:`Admin` it runs in (the store, the config, the live state through the
broker's queries, :meth:`Admin.changed` to put the change on the record), ``args``
the request's JSON object, ``by`` the OS user who asked. The table of every
operation is :data:`gatewayd.admin.OPERATIONS`; the modules that define operations
beside their feature (``card``, ``directory``, ``grant``, ``fido2_registration``)
import only this module, so none of them imports the admin server and the server
imports them all without a circle.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from relay.errors import GatewayError
from relay.message import valid_id

from .audit import AuditLog
from .config import Config
from .event import Event
from .store import Store


class AdminError(GatewayError):
    """A request was refused; the message goes back to ``gw admin``."""


class LiveState(Protocol):
    """What operations ask the broker about live sessions and agents."""

    @property
    def config(self) -> Config: ...

    def online_agents(self) -> dict[str, frozenset[str]]: ...

    def session_rows(self) -> list[dict[str, Any]]: ...

    def kill_session(self, sid: str, reason: str) -> bool: ...

    async def end_session(self, sid: str, reason: str) -> bool: ...

    def cluster_status(self) -> dict[str, Any] | None: ...

    def session_count(self) -> int: ...

    def rejections_pending(self) -> int: ...

    async def revalidate(self, why: str) -> int: ...


class Admin(Protocol):
    """The admin server as operations see it."""

    store: Store
    audit: AuditLog

    @property
    def broker(self) -> LiveState: ...

    @property
    def config(self) -> Config: ...

    def now(self) -> float: ...

    async def changed(self, by: str, op_name: str, **fields: Any) -> None: ...

    async def record(self, event: Event) -> int:
        """Publish a durable event on the daemon's bus; its audit record's sequence number."""
        ...


Operation = Callable[[Admin, dict[str, Any], str], Awaitable[Any]]


def arg_id(args: dict[str, Any], key: str) -> str:
    """``args[key]`` as an identifier, or an AdminError that says what was wrong."""
    value = args.get(key)
    if not isinstance(value, str) or not valid_id(value):
        raise AdminError(f"{key}: expected an identifier (letters, digits, . _ - @), got {value!r}")
    return value


def arg_text(args: dict[str, Any], key: str, default: str | None = None) -> str:
    """``args[key]`` as text (``default`` when absent), or an AdminError."""
    value = args.get(key, default)
    if not isinstance(value, str):
        raise AdminError(f"{key}: expected text")
    return value
