"""The daemon's operational log (not the audit trail): one structlog pipeline for all.

Every line the daemon logs goes through one chain of structlog processors: the
daemon's own ``structlog`` loggers and the standard library's (asyncio, aiomqtt,
psycopg...), which reach it through :class:`structlog.stdlib.ProcessorFormatter`.
Two renderings:

- **journal**, when standard error is the systemd journal (``JOURNAL_STREAM`` names
  its device and inode, systemd.exec(5)): each line starts with its syslog priority
  as sd-daemon(3) reads it (``<3>`` error, ``<4>`` warning, ``<6>`` info, ``<7>``
  debug), then the message and ``key=value`` pairs. The journal keeps the time and the
  unit, so ``journalctl -u gatewayd -p warning`` shows the warnings and worse.
- **json** otherwise: one JSON object per line with ``timestamp``, ``level``,
  ``logger`` and ``event`` (the message).

``key=value`` values are quoted as JSON strings when they hold anything but
``[A-Za-z0-9._:/@+-]``, so text from the wire (a user name with a space or a line
break) cannot forge a field or a line.

A failed login gives one warning line (:func:`log_failed_logins`), for fail2ban and
the like::

    <4>login failed user=alice source=203.0.113.7 port=50022 factor=totp mode=access

(regex: ``^login failed user=\\S+ source=<HOST> ``; docs/operations.md). No secret is
logged: the events carry no password, code or token, only names, addresses and reasons.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from .event import AuthAttempt, Event
from .rejection import source_host

#: syslog priorities (RFC 5424 section 6.2.1) of the log levels.
PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}

_BARE = re.compile(r"^[A-Za-z0-9._:/@+\-\[\]]+$")


def journal_stream(stream: TextIO) -> bool:
    """Whether ``stream`` is the journal's stream that systemd gave this process."""
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def _value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if _BARE.match(text) else json.dumps(text)


def render_journal(_: Any, method: str, event_dict: MutableMapping[str, Any]) -> str:
    """``<N>message key=value ...`` (the priority prefix sd-daemon(3) describes)."""
    level = str(event_dict.pop("level", method)).lower()
    event_dict.pop("timestamp", None)
    event_dict.pop("logger", None)
    message = str(event_dict.pop("event", ""))
    message = json.dumps(message)[1:-1] if not message.isprintable() else message
    # Quoted values (a traceback too) hold no line break: one entry per line.
    pairs = " ".join(f"{key}={_value(value)}" for key, value in event_dict.items())
    return f"<{PRIORITY.get(level, 6)}>{message}{' ' + pairs if pairs else ''}"


def setup(level: str = "info", stream: TextIO | None = None, fmt: str = "auto") -> str:
    """Send every log record (structlog's and the standard library's) through one
    pipeline to ``stream`` (standard error); returns the format chosen."""
    stream = sys.stderr if stream is None else stream
    if fmt == "auto":
        fmt = "journal" if journal_stream(stream) else "json"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.format_exc_info,
    ]
    renderer: Any = render_journal if fmt == "journal" else structlog.processors.JSONRenderer()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    return fmt


_auth_log = structlog.get_logger("gatewayd.auth")
#: The reason of a factor the client did not answer (docs/audit.md), not counted as a guess.
GAVE_UP = "no answer from the client"


def log_failed_logins(event: Event) -> None:
    """An EventBus subscriber: one warning line per failed factor of a login (not when
    the client gave up on a factor: no key plugged in is no guess)."""
    if (
        isinstance(event, AuthAttempt)
        and event.outcome != "success"
        and not event.reason.startswith(GAVE_UP)
    ):
        host = source_host(event.source)
        port = event.source.rpartition(":")[2] if host != event.source else ""
        _auth_log.warning(
            "login failed",
            user=event.user,
            source=host,
            port=port,
            factor=event.factor,
            mode=event.mode,
            reason=event.reason,
        )
