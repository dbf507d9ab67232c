"""The factor interface.

A factor is a pair: a :class:`Verifier` that runs in the gateway and a
:class:`Prover` that runs in ``gw connect``. They talk through the gateway's wire
protocol as opaque ``(method, payload)`` messages, where a payload is a JSON
object (binary values base64url-encoded with :func:`b64e`).

Verifiers are stateless in the python-fido2 way: :meth:`Verifier.begin` returns a
challenge for the prover and a *state* the caller keeps; :meth:`Verifier.complete`
takes that state back with the prover's response and returns an :class:`Outcome`.
Everything a verifier needs arrives in an :class:`AuthContext`: the user's stored
credential for this factor, the factor's settings from the config, the current time
and the TLS channel binding (RFC 9266 ``tls-exporter``). A verifier never touches
the store, the clock or the network, and never hands back a whole new record to be
written: the login waited for the person between reading the credential and this
verdict, so a record built from that copy would undo whatever changed meanwhile. It
reports *what* moves instead (:attr:`Outcome.counter`: "accepted step N", "key K's
counter is now C"; :attr:`Outcome.rehash`: a stronger hash of the same password),
and the gateway's store applies that by a conditional update that fails, failing
the login, if the counter has already reached that value (a replay) or the
credential changed since it was read.

Every proof must be bound to the TLS channel: the prover receives the channel
binding of its own connection and must mix it into what it proves, so that a proof
captured on one connection fails on any other.

The peer only ever learns "authentication failed"; :attr:`Outcome.reason` and
:attr:`Outcome.detail` go to the audit log.
"""

from __future__ import annotations

import base64
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

JSON = dict[str, Any]

#: ``prompt(text, secret)`` asks the person at the client; ``secret`` disables echo.
Prompt = Callable[[str, bool], str]


def b64e(data: bytes) -> str:
    """Encode bytes for a JSON payload (base64url, no padding)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64d(text: object, *, max_len: int = 65536) -> bytes:
    """Decode a payload value written by :func:`b64e`; raise ``ValueError`` if it is not one."""
    if not isinstance(text, str) or len(text) > max_len * 4 // 3 + 4:
        raise ValueError("expected a base64url string")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise ValueError("expected a base64url string") from exc


@dataclass(frozen=True, slots=True)
class AuthContext:
    """What a verifier knows about one login attempt."""

    user: str
    """The user id the client claims."""
    channel_binding: bytes
    """RFC 9266 ``tls-exporter`` value of the client's TLS connection (32 bytes)."""
    now: float
    """Current time, POSIX seconds."""
    source: str
    """The client's address, for the audit record."""
    credential: Mapping[str, Any] | None
    """This factor's stored record for the user, or None when not enrolled."""
    settings: Mapping[str, Any] = field(default_factory=dict)
    """This factor's table from the gateway config (``[auth.<name>]``)."""
    counters: Mapping[str, int] = field(default_factory=dict)
    """This factor's forward-only counters for the user, kept by the gateway outside the
    record: ``""`` is TOTP's last accepted step, a FIDO2 key id its signature counter.
    They override the record's own values, which are those at enrollment."""


@dataclass(frozen=True, slots=True)
class Challenge:
    """What :meth:`Verifier.begin` returns."""

    payload: JSON
    """Sent to the prover."""
    state: JSON = field(default_factory=dict)
    """Kept by the gateway and handed back to :meth:`Verifier.complete`."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """The verdict on one factor."""

    ok: bool
    reason: str
    """Specific reason, for the audit log only (the peer sees a generic failure)."""
    detail: Mapping[str, Any] = field(default_factory=dict)
    """Extra audit fields (a certificate's subject and issuer, a key's id)."""
    counter: tuple[str, int] | None = None
    """If not None, ``(key, value)``: accepting this proof raises the counter ``key``
    (see :attr:`AuthContext.counters`) to ``value``. The gateway applies it only if
    the stored counter is still below ``value`` and the credential is still the one
    verified against; otherwise the login fails after all (a replay, a concurrent change)."""
    rehash: Mapping[str, Any] | None = None
    """If not None, a record for the same secret under a stronger scheme (a password
    moved from scrypt to Argon2id); stored only if the credential did not change meanwhile."""

    @classmethod
    def accept(cls, reason: str = "ok", **kw: Any) -> Outcome:
        return cls(True, reason, **kw)

    @classmethod
    def reject(cls, reason: str, **kw: Any) -> Outcome:
        return cls(False, reason, **kw)


class Verifier(ABC):
    """Gateway side of a factor. Pure: no I/O, no clock, no store."""

    name: ClassVar[str]

    @abstractmethod
    def begin(self, ctx: AuthContext) -> Challenge:
        """Start one proof: return the prover's challenge and the state to keep."""

    @abstractmethod
    def complete(self, ctx: AuthContext, state: JSON, response: JSON) -> Outcome:
        """Check the prover's response. Malformed responses are rejections, never exceptions."""


class Prover(ABC):
    """Client side of a factor. Handed its device or its secret source; never finds it."""

    name: ClassVar[str]

    @abstractmethod
    async def respond(self, challenge: JSON, channel_binding: bytes) -> JSON:
        """Answer a challenge; raise :class:`relay.errors.AuthError` with a clear message."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release devices held for the session."""


@dataclass(frozen=True, slots=True)
class ProverOptions:
    """What ``gw connect`` hands a factor's prover factory."""

    user: str
    prompt: Prompt
    """Ask the person at the terminal."""
    values: Mapping[str, Any] = field(default_factory=dict)
    """Command-line values: ``password``, ``totp``, ``smartcard_reader``, ..."""


@dataclass(frozen=True, slots=True)
class Factor:
    """A registered factor: its name, its verifier and how to build its prover."""

    name: str
    verifier: Callable[[], Verifier]
    prover: Callable[[ProverOptions], Prover]
    description: str = ""
    check_settings: Callable[[Mapping[str, Any]], str | None] | None = None
    """Reads the files ``[auth.<name>]`` names and raises :class:`relay.errors.ConfigError`
    with the key path if they are unusable; returns a warning if the table is valid but
    not filled in yet (logins with the factor fail until it is). ``gatewayd check-config``
    and the daemon's start and reload call it for every factor a mode uses. None:
    nothing to check."""
    enroll: Callable[[str, Mapping[str, str], Mapping[str, Any]], Enrollment] | None = None
    """``enroll(user, params, settings)`` for ``gw admin factor enroll USER FACTOR
    [--param k=v ...]``: makes the user's credential from the administrator's
    parameters and the factor's settings. The gateway stores :attr:`Enrollment.credential`
    sealed, replacing any earlier one (its counters start afresh), and audits the change.
    Raises ``ValueError`` with a one-line message for bad parameters. None: the factor
    is enrolled some other way (or not at all)."""
    reload: Callable[[Mapping[str, Any]], None] | None = None
    """Called on SIGHUP with the factor's new settings (``[auth.<name>]``), for every
    factor loaded in the daemon: forget caches, re-read files. None: nothing to do."""


@dataclass(frozen=True, slots=True)
class Enrollment:
    """What a factor's enrollment hook returns."""

    credential: Mapping[str, Any]
    """The user's record for this factor: stored sealed, handed back as
    :attr:`AuthContext.credential`."""
    shown: Mapping[str, Any] = field(default_factory=dict)
    """Shown to the administrator once (a provisioning URI); never stored or audited."""
