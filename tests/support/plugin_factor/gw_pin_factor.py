"""A small auth factor plug-in, as a site would publish one: a PIN, proved bound to the TLS channel.

Found by gatewayd and gw through the ``gatewayd.auth_factors`` entry point in the
``gw_pin_factor-1.0.dist-info`` folder beside it, when this folder is on the path
(``PYTHONPATH``). It uses only the public contract of :mod:`auth.base`:

- enrollment: ``gw admin factor enroll USER pin [--param pin=DIGITS]`` (a random
  PIN, shown once, without the parameter);
- the prover takes ``gw connect --factor-value pin=DIGITS`` or asks;
- the proof is HMAC-SHA256(PIN, nonce || channel binding), so it fails on any other
  connection;
- on SIGHUP its reload hook writes the settings it was given to ``[auth.pin]
  reloads_file`` (when set), one JSON line per reload.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from typing import Any

from auth.base import (
    JSON,
    AuthContext,
    Challenge,
    Enrollment,
    Factor,
    Outcome,
    Prover,
    ProverOptions,
    Verifier,
    b64d,
    b64e,
)
from relay.errors import AuthError

NAME = "pin"


def _valid(pin: object) -> bool:
    return isinstance(pin, str) and 4 <= len(pin) <= 12 and pin.isascii() and pin.isdigit()


def _mac(pin: str, nonce: bytes, binding: bytes) -> str:
    return hmac.new(pin.encode(), nonce + binding, hashlib.sha256).hexdigest()


class PinVerifier(Verifier):
    name = NAME

    def begin(self, ctx: AuthContext) -> Challenge:
        nonce = b64e(secrets.token_bytes(16))
        return Challenge({"nonce": nonce}, {"nonce": nonce})

    def complete(self, ctx: AuthContext, state: JSON, response: JSON) -> Outcome:
        mac = response.get("mac")
        if not isinstance(mac, str) or len(mac) != 64:
            return Outcome.reject("malformed response")
        pin = ctx.credential.get("pin") if ctx.credential else None
        if not _valid(pin):
            return Outcome.reject("pin not enrolled")
        assert isinstance(pin, str)
        expected = _mac(pin, b64d(state["nonce"]), ctx.channel_binding)
        if not hmac.compare_digest(expected, mac):
            return Outcome.reject("wrong pin")
        return Outcome.accept()


class PinProver(Prover):
    name = NAME

    def __init__(self, options: ProverOptions) -> None:
        self.options = options

    async def respond(self, challenge: JSON, channel_binding: bytes) -> JSON:
        pin: Any = self.options.values.get(NAME)
        if not pin:
            pin = self.options.prompt("PIN: ", True)
        if not pin:
            raise AuthError("no PIN given")
        try:
            nonce = b64d(challenge.get("nonce"), max_len=64)
        except ValueError as exc:
            raise AuthError("malformed PIN challenge from the gateway") from exc
        return {"mac": _mac(str(pin), nonce, channel_binding)}


def enroll(user: str, params: Mapping[str, str], settings: Mapping[str, Any]) -> Enrollment:
    unknown = set(params) - {"pin"}
    if unknown:
        raise ValueError(f"unknown parameter {sorted(unknown)[0]!r} (known: pin)")
    pin = params.get("pin")
    if pin is None:
        pin = f"{secrets.randbelow(10**6):06d}"
    if not _valid(pin):
        raise ValueError("pin: 4 to 12 digits")
    return Enrollment(credential={"pin": pin}, shown={"pin": pin} if "pin" not in params else {})


def reload(settings: Mapping[str, Any]) -> None:
    path = settings.get("reloads_file")
    if isinstance(path, str):
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(dict(settings), sort_keys=True) + "\n")


FACTOR = Factor(
    name=NAME,
    verifier=PinVerifier,
    prover=PinProver,
    description="a PIN, HMAC-bound to the TLS channel (test plug-in)",
    enroll=enroll,
    reload=reload,
)
