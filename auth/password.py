"""Password factor: scrypt hashes (RFC 7914) checked in the gateway.

Stored credential: ``{"hash": "scrypt$<log2 n>$<r>$<p>$<salt>$<key>"}`` (salt and key
base64url). The password travels only inside the client's TLS 1.3 connection and
only in answer to this connection's request; it is never logged.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from cryptography.exceptions import InvalidKey
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from relay.errors import AuthError

from .base import (
    JSON,
    AuthContext,
    Challenge,
    Factor,
    Outcome,
    Prover,
    ProverOptions,
    Verifier,
    b64d,
    b64e,
)

#: scrypt cost: n = 2**15, r = 8, p = 1 (32 MiB, about 0.1 s here) is the OWASP
#: recommendation for interactive logins.
LOG2_N, R, P = 15, 8, 1
KEY_LEN = 32
#: Longest password accepted: bounds the work an attacker can make us do.
MAX_PASSWORD = 1024


def _kdf(salt: bytes, log2_n: int, r: int, p: int) -> Scrypt:
    return Scrypt(salt=salt, length=KEY_LEN, n=2**log2_n, r=r, p=p)


def hash_password(password: str) -> str:
    """A new stored hash for ``password``."""
    salt = os.urandom(16)
    key = _kdf(salt, LOG2_N, R, P).derive(password.encode())
    return f"scrypt${LOG2_N}${R}${P}${b64e(salt)}${b64e(key)}"


def check_password(stored: str, password: str) -> bool:
    """True when ``password`` matches ``stored`` (constant time in the key compare)."""
    try:
        scheme, log2_n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt" or not 10 <= int(log2_n) <= 20:
            return False
        # We write r = 8, p = 1. Bound what a damaged record may ask for: a negative value
        # raises OverflowError, a huge r MemoryError, and a huge p runs for hours.
        if not (1 <= int(r) <= 32 and 1 <= int(p) <= 16):
            return False
        kdf = _kdf(b64d(salt), int(log2_n), int(r), int(p))
        kdf.verify(password.encode(), b64d(key))
    except (ValueError, InvalidKey):
        return False
    return True


@functools.cache
def _dummy() -> str:
    """Checked when the user has no password, so that the reply takes as long either way.

    Made on first use, not at import: ``gw`` imports this module and never needs it.
    """
    return hash_password(os.urandom(8).hex())


class PasswordVerifier(Verifier):
    name = "password"

    def begin(self, ctx: AuthContext) -> Challenge:
        return Challenge({"prompt": "password"})

    def complete(self, ctx: AuthContext, state: JSON, response: JSON) -> Outcome:
        password = response.get("password")
        if not isinstance(password, str) or not 0 < len(password) <= MAX_PASSWORD:
            return Outcome.reject("malformed response")
        stored = ctx.credential.get("hash") if ctx.credential else None
        if not isinstance(stored, str):
            check_password(_dummy(), password)
            return Outcome.reject("no password set")
        if not check_password(stored, password):
            return Outcome.reject("wrong password")
        return Outcome.accept()


class PasswordProver(Prover):
    name = "password"

    def __init__(self, options: ProverOptions) -> None:
        self.options = options

    async def respond(self, challenge: JSON, channel_binding: bytes) -> JSON:
        password: Any = self.options.values.get("password")
        if not password:
            password = self.options.prompt(f"Password for {self.options.user}: ", True)
        if not password:
            raise AuthError("no password given")
        return {"password": password}


FACTOR = Factor("password", PasswordVerifier, PasswordProver, "password, scrypt-hashed")
