"""Password factor: Argon2id hashes (RFC 9106) checked in the gateway.

Stored credential: ``{"hash": <PHC string>}``. New passwords are hashed with Argon2id
at OWASP's recommended minimum (Password Storage Cheat Sheet): m = 19 MiB, t = 2,
p = 1 (``$argon2id$v=19$m=19456,t=2,p=1$<salt>$<key>``). Records written before
Argon2id hold ``scrypt$<log2 n>$<r>$<p>$<salt>$<key>`` (RFC 7914, salt and key
base64url); they are still checked, and the first successful login rehashes the
password with Argon2id (:attr:`auth.base.Outcome.rehash`: the gateway stores it only
if the record did not change meanwhile, so it never undoes a password change).

The password travels only inside the client's TLS 1.3 connection and only in answer
to this connection's request; it is never logged.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any

from argon2 import PasswordHasher, Type, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
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

#: Argon2id cost: OWASP's first recommended set, m = 19 MiB (19456 KiB), t = 2, p = 1,
#: about 40 ms here; RFC 9106's own low-memory profile (64 MiB, t = 3, p = 4) costs
#: three times the memory per login in flight for no gain at one thread.
ARGON2_MEMORY_KIB, ARGON2_TIME, ARGON2_LANES = 19 * 1024, 2, 1
#: Bounds on what a stored Argon2 hash may ask for: ours are well inside; a damaged or
#: planted record must not make a login take a gigabyte or a minute.
MAX_ARGON2_MEMORY_KIB, MAX_ARGON2_TIME, MAX_ARGON2_LANES = 256 * 1024, 10, 8
_HASHER = PasswordHasher(
    time_cost=ARGON2_TIME,
    memory_cost=ARGON2_MEMORY_KIB,
    parallelism=ARGON2_LANES,
    hash_len=32,
    salt_len=16,
    type=Type.ID,
)

#: Password hashes computed at once in this process; the others wait their turn. Each
#: holds its whole memory cost (19 MiB for ours, 32 MiB for an old scrypt record) for
#: its ~40 ms, so this bounds the daemon's peak: a burst of logins queues instead of
#: adding 19 MiB each. One: a hash keeps a core busy, and a gatewayd runs per core.
MAX_HASHES_IN_FLIGHT = 1
_IN_FLIGHT = threading.BoundedSemaphore(MAX_HASHES_IN_FLIGHT)

#: scrypt cost of records written before Argon2id: n = 2**15, r = 8, p = 1 (32 MiB).
LOG2_N, R, P = 15, 8, 1
KEY_LEN = 32
#: Longest password accepted: bounds the work an attacker can make us do.
MAX_PASSWORD = 1024


def _kdf(salt: bytes, log2_n: int, r: int, p: int) -> Scrypt:
    return Scrypt(salt=salt, length=KEY_LEN, n=2**log2_n, r=r, p=p)


def hash_password(password: str) -> str:
    """A new stored hash for ``password`` (Argon2id)."""
    with _IN_FLIGHT:
        return _HASHER.hash(password)


def scrypt_hash(password: str) -> str:
    """A hash in the scrypt format of older records (for tests of the migration)."""
    salt = os.urandom(16)
    with _IN_FLIGHT:
        key = _kdf(salt, LOG2_N, R, P).derive(password.encode())
    return f"scrypt${LOG2_N}${R}${P}${b64e(salt)}${b64e(key)}"


def needs_rehash(stored: str) -> bool:
    """True when ``stored`` is not an Argon2id hash at today's parameters."""
    if not stored.startswith("$argon2id$"):
        return True
    try:
        return _HASHER.check_needs_rehash(stored)
    except (InvalidHashError, ValueError):
        return True


def _check_argon2(stored: str, password: str) -> bool:
    try:
        params = extract_parameters(stored)
        if params.type is not Type.ID or not (
            params.memory_cost <= MAX_ARGON2_MEMORY_KIB
            and params.time_cost <= MAX_ARGON2_TIME
            and params.parallelism <= MAX_ARGON2_LANES
        ):
            return False
        with _IN_FLIGHT:
            return _HASHER.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError, ValueError):
        return False


def _check_scrypt(stored: str, password: str) -> bool:
    try:
        scheme, log2_n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt" or not 10 <= int(log2_n) <= 20:
            return False
        # We wrote r = 8, p = 1. Bound what a damaged record may ask for: a negative value
        # raises OverflowError, a huge r MemoryError, and a huge p runs for hours.
        if not (1 <= int(r) <= 32 and 1 <= int(p) <= 16):
            return False
        kdf = _kdf(b64d(salt), int(log2_n), int(r), int(p))
        with _IN_FLIGHT:
            kdf.verify(password.encode(), b64d(key))
    except (ValueError, InvalidKey):
        return False
    return True


def check_password(stored: str, password: str) -> bool:
    """True when ``password`` matches ``stored`` (Argon2id, or an older scrypt record)."""
    if stored.startswith("$argon2"):
        return _check_argon2(stored, password)
    return _check_scrypt(stored, password)


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
        if needs_rehash(stored):
            # Once per user: the next login finds Argon2id at today's parameters.
            return Outcome.accept(
                rehash={**dict(ctx.credential or {}), "hash": hash_password(password)},
                detail={"rehashed": stored.partition("$")[0] or "argon2"},
            )
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


FACTOR = Factor("password", PasswordVerifier, PasswordProver, "password, Argon2id-hashed")
