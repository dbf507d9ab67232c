"""FIDO2 security keys for users: one-time codes, the ``register`` role, ``gw admin fido2``.

How a key reaches a user
------------------------

1. An administrator runs ``gw admin fido2 invite USER``. The gateway makes a one-time
   registration code (80 random bits, shown as ``ABCD-EFGH-IJKL-MNOP``), keeps only
   its SHA-256 with an expiry (24 hours unless ``--ttl`` says otherwise) and audits
   ``admin.change`` (op ``fido2.invite``; never the code itself).
2. The person runs ``gw fido2 register --user USER --code CODE`` with the key plugged
   in. On the wire (see :mod:`relay.registration`) the client sends ``register``
   {user, method: "fido2", code}; :func:`serve_registration` checks the source's rate
   limit (the one logins share) and the code, then sends ``auth_request`` {method:
   "fido2", payload}: WebAuthn creation options whose challenge is bound to this TLS
   connection (:func:`auth.fido2.registration_begin`). The client's ``auth_response``
   is checked by :func:`auth.fido2.registration_complete` against that same channel
   binding; only then is the code marked used and the key appended to the user's
   ``fido2`` credential record. The gateway answers ``registered`` {method,
   credential}. Every attempt, good or bad, is audited as ``fido2.register`` with
   ``outcome``, ``reason`` and ``source``.
3. ``gw admin fido2 list USER`` shows the user's keys; ``gw admin fido2 remove USER
   KEY_ID`` removes one (audited ``admin.change``, op ``fido2.remove``).

A failed registration (touch timeout, a key the gateway refuses) leaves the code
valid until it expires, so the person can try again; a code is used up only by a
registration that stored a key. Attempts count against the source's login rate limit.
"""

from __future__ import annotations

import base64
import os
import secrets
import time
from typing import TYPE_CHECKING, Any, Final

import structlog

from auth import fido2
from auth.base import b64d, b64e
from relay import message as m
from relay.aio import ConnectionClosed, FramedLink
from relay.errors import AuthError, ConfigError, RemoteError

from .config import Config
from .event import Fido2Registered
from .login import source_key
from .operation import Admin, AdminError, arg_id, arg_text

if TYPE_CHECKING:
    from .broker import Broker

log = structlog.get_logger("gatewayd.fido2")

METHOD: Final = "fido2"
EVENT: Final = "fido2.register"

CODE_BYTES: Final = 10
"""80 random bits: at the login rate limit (30 a minute per source) guessing one code
within its day would take over 10^19 years."""
CODE_TTL: Final = 86400.0
"""Seconds a registration code stays valid unless the administrator says otherwise."""
MIN_TTL, MAX_TTL = 60.0, 30 * 86400.0
"""A code valid less than a minute cannot be typed; one valid beyond a month is forgotten."""
ANSWER_GRACE: Final = 60.0
"""Seconds on top of ``[auth.fido2] timeout`` for the network and for typing a PIN."""

_CODE_GROUP: Final = 4
_USER_HANDLE_BYTES: Final = 16
_GENERIC: Final = "registration code unknown, used or expired"
_CODE_REASONS: Final = {"used": "code already used", "expired": "code expired"}
# Characters people type for base32 letters that look alike.
_LOOKALIKES: Final = str.maketrans({"0": "O", "1": "I", "8": "B", "-": None, " ": None})


def new_code() -> str:
    """A fresh registration code, base32 in groups of four: ``ABCD-EFGH-IJKL-MNOP``."""
    text = base64.b32encode(secrets.token_bytes(CODE_BYTES)).decode("ascii")
    return "-".join(text[i : i + _CODE_GROUP] for i in range(0, len(text), _CODE_GROUP))


def normalize_code(text: str) -> str:
    """The code as it is hashed: upper case, without dashes or spaces, look-alikes mapped."""
    return text.strip().upper().translate(_LOOKALIKES)


def settings_of(config: Config) -> fido2.Fido2Settings:
    """The gateway's ``[auth.fido2]`` settings; ConfigError if absent, invalid or unusable."""
    table = config.auth.get(METHOD)
    if table is None:
        raise ConfigError(
            "auth.fido2", "not configured: add [auth.fido2] with rp_id = the gateway's DNS name"
        )
    settings = fido2.parse_settings(table)
    fido2.FACTOR.verifier()  # ConfigError with the install hint when python-fido2 is missing
    return settings


def modes_accepting(config: Config) -> list[str]:
    """Modes whose factor steps let a security key stand in for a step."""
    return [name for name in m.MODES if any(METHOD in step for step in config.mode(name).factors)]


def _user_handle(record: dict[str, Any] | None) -> str:
    """The user's WebAuthn user handle: random, kept in the record, no personal data in it."""
    handle = (record or {}).get("user_handle")
    if isinstance(handle, str) and handle:
        return handle
    return b64e(os.urandom(_USER_HANDLE_BYTES))


# -- the register role (gateway side) ---------------------------------------------------


async def serve_registration(broker: Broker, link: FramedLink, hello: m.RegisterHello) -> None:
    """Serve one ``register`` connection: code, challenge, response, store, audit, reply."""
    audit, store = broker.audit, broker.store
    fields: dict[str, Any] = {"user": hello.user, "method": hello.method, "source": link.peer}

    async def refuse(reason: str, code: str, message: str, **detail: Any) -> None:
        await broker.bus.record(
            Fido2Registered(**fields, outcome="failure", reason=reason, detail=detail)
        )
        link.send_error(code, message)

    if audit.failure is not None:
        link.send_error("unavailable", "the gateway cannot write its audit log")
        return
    if not broker.auth_limiter.allow(source_key(link.peer), time.monotonic()):
        await refuse("rate limited", "rate_limited", "too many attempts; try again later")
        return
    if hello.method != METHOD:
        await refuse(
            f"unsupported method {hello.method!r}",
            "protocol_error",
            f"this gateway registers only {METHOD} credentials",
        )
        return
    try:
        settings = settings_of(broker.config)
    except ConfigError as exc:
        log.error("security key registration attempted, but FIDO2 is unusable", error=str(exc))
        await refuse(f"not configured: {exc}", "unavailable", "this gateway takes no security keys")
        return

    code = normalize_code(hello.code)
    now = broker.now()
    state = (
        await store.registration_code_state(hello.user, METHOD, code, now) if code else "unknown"
    )
    if state != "valid":
        await refuse(_CODE_REASONS.get(state, "unknown code"), "auth_failed", _GENERIC)
        return
    user = await store.get_user(hello.user)
    if user is None or user.disabled:
        await refuse("user disabled", "auth_failed", _GENERIC)
        return

    record = await store.get_credential(hello.user, METHOD)
    handle = _user_handle(record)
    try:
        payload, verifier_state = fido2.registration_begin(
            settings.rp_id,
            settings.rp_name,
            b64d(handle),
            hello.user,
            record,
            link.channel_binding(),
            settings.user_verification,
            origin=settings.origin,
            timeout=settings.timeout,
        )
    except AuthError as exc:  # the user already holds the most keys allowed
        await refuse(str(exc), "denied", str(exc))
        return
    link.extend_handshake(settings.timeout + ANSWER_GRACE)
    link.send(m.AuthRequest(METHOD, payload))
    try:
        response = await link.expect(m.AuthResponse)
    except (ConnectionClosed, RemoteError) as exc:
        # The person gave up, the key timed out, gw could not find the key: on the record.
        await broker.bus.record(
            Fido2Registered(
                **fields, outcome="failure", reason=f"no answer from the client ({exc.code})"
            )
        )
        return
    assert isinstance(response, m.AuthResponse)
    if response.method != METHOD:
        await refuse(f"answered {response.method[:32]}", "auth_failed", "registration failed")
        return

    # The record is read again now (the person took a while) and written back only if
    # it is still that version: a key removed or added meanwhile is never undone.
    now = broker.now()
    loaded = await store.load_credential(hello.user, METHOD)
    current = loaded.data if loaded is not None else None
    try:
        new_record, key = fido2.registration_complete(
            verifier_state, response.payload, current, now=now
        )
    except AuthError as exc:
        await refuse(
            str(exc).removeprefix("FIDO2 registration rejected: "),
            "auth_failed",
            "the gateway refused this security key (its audit log says why)",
        )
        return
    if not await store.take_registration_code(hello.user, METHOD, code, now):
        # Used by a concurrent registration, or expired while the person touched the key.
        state = await store.registration_code_state(hello.user, METHOD, code, now)
        await refuse(_CODE_REASONS.get(state, "unknown code"), "auth_failed", _GENERIC)
        return
    new_record.setdefault("user_handle", handle)
    if loaded is None:
        stored = await store.add_credential(hello.user, METHOD, new_record, now)
    else:
        stored = await store.replace_credential(hello.user, METHOD, new_record, loaded.version, now)
    if not stored:  # nothing awaits since the read: only another process could get here
        await refuse("credential changed meanwhile; try again", "auth_failed", _GENERIC)
        return
    await broker.bus.record(
        Fido2Registered(
            **fields,
            outcome="success",
            reason="ok",
            detail={
                "key_id": key["id"],
                "key_name": key["name"],
                "aaguid": key["aaguid"],
                "attestation": key["attestation"],
                "attestation_verified": key["attestation_verified"],
                "user_verified": key["user_verified"],
                "keys": len(new_record["credentials"]),
            },
        )
    )
    shown = ("id", "name", "aaguid", "attestation", "user_verified", "added")
    link.send(m.Registered(METHOD, {k: key[k] for k in shown}))


# -- gw admin fido2 ------------------------------------------------------------------


async def _existing_user(s: Admin, args: dict[str, Any]) -> str:
    user = arg_id(args, "user")
    if await s.store.get_user(user) is None:
        raise AdminError(f"no user {user!r}")
    return user


async def invite(s: Admin, args: dict[str, Any], by: str) -> Any:
    user = await _existing_user(s, args)
    try:
        settings = settings_of(s.config)
    except ConfigError as exc:
        raise AdminError(f"security keys cannot be registered here: {exc}") from exc
    ttl = args.get("ttl", CODE_TTL)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not MIN_TTL <= ttl <= MAX_TTL:
        raise AdminError("ttl: between 60 seconds and 30 days")
    code = new_code()
    now = s.now()
    expires = now + float(ttl)
    await s.store.add_registration_code(
        user, METHOD, normalize_code(code), expires=expires, by=by, now=now
    )
    await s.changed(by, "fido2.invite", user=user, expires=expires)
    return {
        "user": user,
        "code": code,
        "expires": expires,
        "rp_id": settings.rp_id,
        "modes": modes_accepting(s.config),
    }


async def list_keys(s: Admin, args: dict[str, Any], by: str) -> Any:
    user = await _existing_user(s, args)
    loaded = await s.store.load_credential(user, METHOD)
    if loaded is None:
        return []
    keys = fido2.list_credentials(loaded.data)
    for key in keys:  # the counter as the last login left it
        key["sign_count"] = max(key.get("sign_count", 0), loaded.counters.get(key["id"], 0))
        if key["id"] in loaded.moved:
            key["last_used"] = loaded.moved[key["id"]]
    return keys


async def remove_key(s: Admin, args: dict[str, Any], by: str) -> Any:
    user = await _existing_user(s, args)
    key_id = arg_text(args, "key")
    loaded = await s.store.load_credential(user, METHOD)
    record = loaded.data if loaded is not None else None
    try:
        new_record = fido2.remove_credential(record, key_id)
    except AuthError as exc:
        raise AdminError(str(exc)) from exc
    assert loaded is not None  # remove_credential found the key
    kept = {e["id"] for e in fido2.list_credentials(new_record)}
    (removed,) = [e for e in fido2.list_credentials(record) if e["id"] not in kept]
    # Written only over the version read: a key registered meanwhile is not dropped.
    if new_record["credentials"]:
        done = await s.store.replace_credential(
            user, METHOD, new_record, loaded.version, s.now(), drop_counters=(removed["id"],)
        )
    else:  # no key left: the user no longer holds the factor at all (counters go too)
        done = await s.store.delete_credential(user, METHOD, loaded.version)
    if not done:
        raise AdminError("the user's security keys changed meanwhile; list them and try again")
    await s.changed(
        by, "fido2.remove", user=user, key_id=removed["id"], key_name=removed.get("name", "")
    )
    return {"user": user, "id": removed["id"], "name": removed.get("name", ""), "left": len(kept)}
