"""TOTP factor (RFC 6238): 30-second steps, 6 digits, one step of drift each way.

Stored credential: ``{"secret": <base32, 160 bits>}`` (older records also carry
``"last_counter"``). A code is accepted at most once per user: the step it matched
must be later than the last step accepted, so a replayed (or older) code fails. The
last accepted step is the gateway's counter ``""`` (:attr:`auth.base.AuthContext.counters`);
an accepted code reports ``Outcome.counter = ("", step)`` and the gateway raises the
counter only if it is still below that step, so two logins racing with one code (or
a login parked at the prompt while the code was used elsewhere) cannot both pass.
The gateway stores the credential encrypted (see ``gatewayd.store``), so the secret
cannot be read from the database file alone.
"""

from __future__ import annotations

import hmac
from typing import Any

import pyotp

from relay.errors import AuthError

from .base import JSON, AuthContext, Challenge, Factor, Outcome, Prover, ProverOptions, Verifier

STEP = 30
DIGITS = 6
#: Steps of clock drift accepted on each side of now (RFC 6238 section 5.2).
DRIFT = 1
#: RFC 4226 section 4 asks for 128 bits at least and recommends 160.
SECRET_BYTES = 20
#: The key of the gateway's counter that holds the last accepted step.
COUNTER = ""


def new_secret() -> str:
    """A fresh base32 secret of 160 bits."""
    return pyotp.random_base32(length=SECRET_BYTES * 8 // 5)


def provisioning_uri(secret: str, user: str, issuer: str) -> str:
    """The ``otpauth://`` URI an authenticator app scans."""
    return pyotp.TOTP(secret, digits=DIGITS, interval=STEP).provisioning_uri(
        name=user, issuer_name=issuer
    )


def code_at(secret: str, when: float) -> str:
    """The code for time ``when`` (tests and the demo use it)."""
    return pyotp.TOTP(secret, digits=DIGITS, interval=STEP).at(int(when))


class TotpVerifier(Verifier):
    name = "totp"

    def begin(self, ctx: AuthContext) -> Challenge:
        return Challenge({"digits": DIGITS, "step": STEP})

    def complete(self, ctx: AuthContext, state: JSON, response: JSON) -> Outcome:
        code = response.get("code")
        # isascii(): str.isdigit() also takes "١٢٣٤٥٦", which hmac.compare_digest refuses.
        if (
            not isinstance(code, str)
            or len(code) != DIGITS
            or not (code.isascii() and code.isdigit())
        ):
            return Outcome.reject("malformed response")
        cred = ctx.credential
        secret = cred.get("secret") if cred else None
        if cred is None or not isinstance(secret, str):
            return Outcome.reject("totp not enrolled")
        last = cred.get("last_counter", -1)
        if not isinstance(last, int) or isinstance(last, bool):
            last = -1
        last = max(last, ctx.counters.get(COUNTER, -1))
        now_counter = int(ctx.now) // STEP
        matched = None
        try:
            totp = pyotp.TOTP(secret, digits=DIGITS, interval=STEP)
            candidates = [
                (counter, totp.generate_otp(counter))
                for counter in range(now_counter - DRIFT, now_counter + DRIFT + 1)
            ]
        except ValueError:  # binascii.Error included: the stored secret is not base32
            return Outcome.reject("stored totp secret is unusable")
        for counter, expected in candidates:
            if hmac.compare_digest(expected, code):
                matched = counter
        if matched is None:
            return Outcome.reject("wrong code")
        if matched <= last:
            return Outcome.reject("code already used", detail={"step": matched})
        return Outcome.accept(counter=(COUNTER, matched))


class TotpProver(Prover):
    name = "totp"

    def __init__(self, options: ProverOptions) -> None:
        self.options = options

    async def respond(self, challenge: JSON, channel_binding: bytes) -> JSON:
        code: Any = self.options.values.get("totp")
        if not code:
            code = self.options.prompt("Authenticator code: ", False)
        code = str(code or "").strip().replace(" ", "")
        if not code:
            raise AuthError("no authenticator code given")
        return {"code": code}


FACTOR = Factor("totp", TotpVerifier, TotpProver, "time-based one-time code (RFC 6238)")
