"""The directory: orgs, vendors, users, factor credentials, agents, agreements, grants.

SQLite in WAL mode. The daemon is the only writer (``gw admin`` goes through its
admin socket). Factor credentials are stored sealed with AES-256-GCM under the key
in ``store.secrets_key_file``, with the user and factor name as associated data,
so a copy of the database alone reveals no TOTP seed and a sealed blob cannot be
moved to another user.

All methods are synchronous and short; they run on the event loop thread.

State that logins change moves only by atomic conditional updates, never by writing
back a copy read before an ``await``:

- each credential row carries a ``version``; a whole-record write made from a copy
  (an admin's re-enrollment, a key added or removed, a password rehashed) names the
  version it was made from and fails if the row moved on meanwhile
  (``UPDATE ... WHERE version = ?``);
- counters that only go forward (TOTP's last accepted step, each FIDO2 key's signature
  counter) live in ``factor_counters``, one row per (user, factor, key), outside the
  sealed record: a login raises one with ``... WHERE counter < ?``, so a replayed code
  or a cloned key's old count fails. TOTP's step moves only while the credential is
  still the version the login verified against (a code of a replaced seed never
  counts); a key's counter row exists from its first use until the key is removed,
  and decides alone while it exists (another key added meanwhile fails no login);
- the lockout: :meth:`Store.begin_attempt` takes a slot for one factor check only
  while the account is unlocked and fewer checks are in flight than failures are left
  before the lock; :meth:`Store.end_attempt` counts the outcome and decides the lock in
  the same transaction. So parallel connections get no more guesses than one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from relay.errors import GatewayError

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS orgs (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, created REAL NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS vendors (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, created REAL NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0, source_networks TEXT NOT NULL DEFAULT '[]');
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('vendor', 'employee')),
    vendor TEXT REFERENCES vendors(id), org TEXT REFERENCES orgs(id),
    created REAL NOT NULL, disabled INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0, locked_until REAL NOT NULL DEFAULT 0,
    last_failure REAL NOT NULL DEFAULT 0, pending INTEGER NOT NULL DEFAULT 0,
    admin_locked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS credentials (
    user TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE, method TEXT NOT NULL,
    sealed BLOB NOT NULL, updated REAL NOT NULL, version INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (user, method));
CREATE TABLE IF NOT EXISTS factor_counters (
    user TEXT NOT NULL, method TEXT NOT NULL, key TEXT NOT NULL,
    counter INTEGER NOT NULL, updated REAL NOT NULL, PRIMARY KEY (user, method, key),
    FOREIGN KEY (user, method) REFERENCES credentials(user, method) ON DELETE CASCADE);
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY, org TEXT NOT NULL REFERENCES orgs(id), created REAL NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0,
    token_hash TEXT, token_expires REAL,
    cert_fingerprint TEXT, noise_key TEXT, enrolled REAL, last_seen REAL, pq_key TEXT);
CREATE TABLE IF NOT EXISTS agreements (
    id TEXT PRIMARY KEY, vendor TEXT NOT NULL REFERENCES vendors(id),
    org TEXT NOT NULL REFERENCES orgs(id), modes TEXT NOT NULL,
    unattended INTEGER NOT NULL DEFAULT 0, valid_from REAL, valid_until REAL,
    state TEXT NOT NULL DEFAULT 'active', vendor_accepted REAL, org_accepted REAL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS grants (
    user TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    agent TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    created REAL NOT NULL, PRIMARY KEY (user, agent));
CREATE TABLE IF NOT EXISTS registration_codes (
    code_hash TEXT PRIMARY KEY,
    user TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE, method TEXT NOT NULL,
    created REAL NOT NULL, expires REAL NOT NULL, created_by TEXT NOT NULL, used REAL);
"""

#: Columns added since schema 1: (table, column, definition), added by ALTER TABLE.
_ADDED_COLUMNS = (
    ("users", "last_failure", "REAL NOT NULL DEFAULT 0"),
    ("users", "pending", "INTEGER NOT NULL DEFAULT 0"),
    ("users", "admin_locked", "INTEGER NOT NULL DEFAULT 0"),
    ("credentials", "version", "INTEGER NOT NULL DEFAULT 1"),
    ("agents", "pq_key", "TEXT"),
)


class StoreError(GatewayError):
    """A directory operation failed: unknown or duplicate id, bad reference."""


@dataclass(frozen=True, slots=True)
class User:
    id: str
    kind: str  # "vendor" | "employee"
    vendor: str | None
    org: str | None
    disabled: bool
    failures: int
    locked_until: float
    admin_locked: bool = False
    """Locked after too many consecutive failures: only ``gw admin user unlock`` opens it."""


@dataclass(frozen=True, slots=True)
class Credential:
    """A factor credential as a login sees it."""

    data: dict[str, Any]
    """The unsealed record (a TOTP secret, a password hash, the FIDO2 keys)."""
    version: int
    """Grows with every whole-record write; a conditional write names the one it read."""
    counters: dict[str, int]
    """Forward-only counters by key: ``""`` for TOTP's last step, a key id for FIDO2."""
    moved: dict[str, float] = field(default_factory=dict)
    """When each counter last moved (a FIDO2 key's last use)."""


class Attempt(StrEnum):
    """What :meth:`Store.begin_attempt` decided about checking one factor."""

    GO = "go"
    """A slot is taken: check the factor, then call :meth:`Store.end_attempt`."""
    LOCKED = "account locked"
    ADMIN_LOCKED = "account locked until an administrator unlocks it"
    BUSY = "too many attempts at once"
    """As many checks are in flight as failures are left before the lock."""
    UNKNOWN = "unknown user"


@dataclass(frozen=True, slots=True)
class AttemptEnd:
    """What :meth:`Store.end_attempt` recorded."""

    failures: int
    """Consecutive failures now (after decay)."""
    locked_until: float
    """The account's lock (0 or in the past: not locked by time)."""
    admin_locked: bool
    newly_locked: float | None = None
    """Seconds of the lock this failure set (``inf`` for an admin lock), else None."""

    def locked(self, now: float) -> bool:
        return self.admin_locked or self.locked_until > now


@dataclass(frozen=True, slots=True)
class Lockout:
    """The lockout policy (the ``[lockout]`` table)."""

    threshold: int = 5
    base_seconds: float = 60.0
    max_seconds: float = 3600.0
    decay_seconds: float = 86400.0
    hard_limit: int = 100

    def lock_seconds(self, failures: int) -> float:
        """Lock length after ``failures`` consecutive failures (0: no lock)."""
        if failures < self.threshold:
            return 0.0
        # Exponent capped: 2**64 seconds is past any max_seconds a config allows.
        seconds = self.base_seconds * 2.0 ** min(failures - self.threshold, 64)
        return float(min(seconds, self.max_seconds))


@dataclass(frozen=True, slots=True)
class Agent:
    id: str
    org: str
    disabled: bool
    enrolled: bool
    cert_fingerprint: str | None
    noise_key: str | None
    token_expires: float | None
    last_seen: float | None
    pq_key: str | None = None
    """The agent's ML-KEM-768 public key (base64url); None if enrolled before it."""


@dataclass(frozen=True, slots=True)
class Agreement:
    id: str
    vendor: str
    org: str
    modes: tuple[str, ...]
    unattended: bool
    valid_from: float | None
    valid_until: float | None
    state: str
    vendor_accepted: float | None
    org_accepted: float | None


def token_hash(token: str) -> str:
    """How enrollment tokens are kept: SHA-256 (they are 256-bit random values)."""
    return hashlib.sha256(token.encode()).hexdigest()


def load_secrets_key(path: Path) -> bytes:
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise StoreError(f"cannot read secrets key {path}: {exc.strerror or exc}") from exc
    if len(key) != 32:
        raise StoreError(f"secrets key {path} must hold exactly 32 bytes")
    return key


class Store:
    """The SQLite directory. One instance per process."""

    def __init__(self, path: Path, secrets_key: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA busy_timeout=5000")
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"{path} has schema {version}, newer than this gatewayd knows")
        # executescript() commits on its own; the schema is idempotent (IF NOT EXISTS).
        self.db.executescript(_SCHEMA)
        for table, column, definition in _ADDED_COLUMNS:
            have = {r["name"] for r in self.db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        # Checks in flight when the last process stopped never ended: free their slots.
        # (One daemon per state directory holds the database.)
        self.db.execute("UPDATE users SET pending = 0 WHERE pending != 0")
        self._aead = AESGCM(secrets_key)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _one(self, sql: str, *args: Any) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.db.execute(sql, args).fetchone()
        return row

    def _insert(self, what: str, sql: str, *args: Any) -> None:
        try:
            with self.tx() as db:
                db.execute(sql, args)
        except sqlite3.IntegrityError as exc:
            msg = str(exc)
            if "UNIQUE" in msg or "PRIMARY KEY" in msg:
                raise StoreError(f"{what} already exists") from exc
            raise StoreError(f"{what}: {msg}") from exc

    def _require(self, table: str, ident: str) -> None:
        if self._one(f"SELECT 1 FROM {table} WHERE id = ?", ident) is None:  # noqa: S608
            raise StoreError(f"no {table[:-1]} {ident!r}")

    # -- orgs and vendors -------------------------------------------------------------

    def add_org(self, org: str, name: str, now: float) -> None:
        self._insert(f"org {org!r}", "INSERT INTO orgs VALUES (?, ?, ?, 0)", org, name, now)

    def add_vendor(self, vendor: str, name: str, now: float) -> None:
        self._insert(
            f"vendor {vendor!r}",
            "INSERT INTO vendors (id, name, created) VALUES (?, ?, ?)",
            vendor,
            name,
            now,
        )

    def list_rows(self, table: str, ident: str | None = None) -> list[dict[str, Any]]:
        """Rows of a table for ``gw admin`` (secrets left out); only ``ident``'s if given."""
        assert table in ("orgs", "vendors", "users", "agents", "agreements", "grants")
        cols = {
            "agents": "id, org, created, disabled, cert_fingerprint, noise_key, enrolled, "
            "last_seen, token_expires, CASE WHEN noise_key IS NULL THEN NULL "
            "WHEN pq_key IS NULL THEN 'classic' ELSE 'hybrid' END AS e2e",
        }.get(table, "*")
        where, args = ("WHERE id = ?", (ident,)) if ident is not None else ("", ())
        sql = f"SELECT {cols} FROM {table} {where} ORDER BY 1"  # noqa: S608 - fixed names
        return [dict(r) for r in self.db.execute(sql, args)]

    def vendor_disabled(self, vendor: str) -> bool | None:
        row = self._one("SELECT disabled FROM vendors WHERE id = ?", vendor)
        return None if row is None else bool(row["disabled"])

    def org_disabled(self, org: str) -> bool:
        row = self._one("SELECT disabled FROM orgs WHERE id = ?", org)
        return row is None or bool(row["disabled"])

    def org_exists(self, org: str) -> bool:
        return self._one("SELECT 1 FROM orgs WHERE id = ?", org) is not None

    # -- users and credentials ----------------------------------------------------------

    def add_user(
        self, user: str, *, kind: str, vendor: str | None, org: str | None, now: float
    ) -> None:
        if vendor is not None:
            self._require("vendors", vendor)
        if org is not None:
            self._require("orgs", org)
        self._insert(
            f"user {user!r}",
            "INSERT INTO users (id, kind, vendor, org, created) VALUES (?, ?, ?, ?, ?)",
            user,
            kind,
            vendor,
            org,
            now,
        )

    def get_user(self, user: str) -> User | None:
        row = self._one("SELECT * FROM users WHERE id = ?", user)
        if row is None:
            return None
        return User(
            row["id"],
            row["kind"],
            row["vendor"],
            row["org"],
            bool(row["disabled"]),
            row["failures"],
            row["locked_until"],
            bool(row["admin_locked"]),
        )

    # -- the lockout ----------------------------------------------------------------------

    #: Consecutive failures after decay: one forgiven per full ``decay`` seconds since the
    #: last failure (a clock that went back forgives nothing).
    _DECAYED = "MAX(0, failures - CAST(MAX(0, :now - last_failure) / :decay AS INTEGER))"

    def begin_attempt(self, user: str, now: float, policy: Lockout) -> Attempt:
        """Take a slot to check one factor of ``user``, or say why not.

        A slot is given only while the account is not locked and fewer checks are in
        flight than failures are left before the lock (at least one once the lock has
        run out), so N parallel connections get no more guesses than one connection.
        Every :attr:`Attempt.GO` must be followed by one :meth:`end_attempt`.
        """
        args = {"u": user, "now": now, "decay": policy.decay_seconds, "t": policy.threshold}
        with self.tx() as db:
            row = db.execute(
                "UPDATE users SET pending = pending + 1 WHERE id = :u AND admin_locked = 0 "  # noqa: S608 - a fixed expression
                "AND locked_until <= :now "
                f"AND pending < MAX(1, :t - {self._DECAYED}) RETURNING pending",
                args,
            ).fetchone()
            if row is not None:
                return Attempt.GO
            state = db.execute(
                "SELECT admin_locked, locked_until FROM users WHERE id = ?", (user,)
            ).fetchone()
        if state is None:
            return Attempt.UNKNOWN
        if state["admin_locked"]:
            return Attempt.ADMIN_LOCKED
        if state["locked_until"] > now:
            return Attempt.LOCKED
        return Attempt.BUSY

    def end_attempt(
        self, user: str, *, ok: bool, final: bool, now: float, policy: Lockout
    ) -> AttemptEnd:
        """Give back the slot of :meth:`begin_attempt` and count its outcome, atomically.

        A failure adds one to the (decayed) consecutive failures and, at the threshold,
        locks the account for :meth:`Lockout.lock_seconds`; at ``policy.hard_limit``
        until an administrator unlocks it (NIST SP 800-63B section 5.2.2: at most 100
        consecutive failures). A success of the ``final`` factor clears the failures,
        but only if no lock was set meanwhile: the caller must check
        :meth:`AttemptEnd.locked` and fail the login if it is.
        """
        args = {"u": user, "now": now, "decay": policy.decay_seconds}
        with self.tx() as db:
            if ok:
                row = db.execute(
                    "UPDATE users SET pending = MAX(pending - 1, 0) WHERE id = :u "
                    "RETURNING failures, locked_until, admin_locked",
                    args,
                ).fetchone()
                if row is None:
                    return AttemptEnd(0, 0.0, False)
                if final and not row["admin_locked"] and row["locked_until"] <= now:
                    db.execute(
                        "UPDATE users SET failures = 0, last_failure = 0, locked_until = 0 "
                        "WHERE id = :u",
                        args,
                    )
                    return AttemptEnd(0, 0.0, False)
                return AttemptEnd(row["failures"], row["locked_until"], bool(row["admin_locked"]))
            row = db.execute(
                "UPDATE users SET pending = MAX(pending - 1, 0), "  # noqa: S608 - a fixed expression
                f"failures = {self._DECAYED} + 1, last_failure = :now WHERE id = :u "
                "RETURNING failures, locked_until, admin_locked",
                args,
            ).fetchone()
            if row is None:
                return AttemptEnd(0, 0.0, False)
            failures = int(row["failures"])
            locked_until, admin_locked = float(row["locked_until"]), bool(row["admin_locked"])
            newly: float | None = None
            if failures >= policy.hard_limit and not admin_locked:
                admin_locked, newly = True, math.inf
                db.execute("UPDATE users SET admin_locked = 1 WHERE id = :u", args)
            elif not admin_locked and (seconds := policy.lock_seconds(failures)) > 0:
                locked_until, newly = max(locked_until, now + seconds), seconds
                db.execute(
                    "UPDATE users SET locked_until = :until WHERE id = :u",
                    {**args, "until": locked_until},
                )
        return AttemptEnd(failures, locked_until, admin_locked, newly)

    def cancel_attempt(self, user: str) -> None:
        """Give back a slot whose check never finished (the connection was cancelled)."""
        with self.tx() as db:
            db.execute("UPDATE users SET pending = MAX(pending - 1, 0) WHERE id = ?", (user,))

    def unlock(self, user: str) -> User:
        """Clear the user's failures and locks (``gw admin user unlock``); the user before."""
        before = self.get_user(user)
        if before is None:
            raise StoreError(f"no user {user!r}")
        with self.tx() as db:
            db.execute(
                "UPDATE users SET failures = 0, last_failure = 0, locked_until = 0, "
                "admin_locked = 0 WHERE id = ?",
                (user,),
            )
        return before

    # -- credentials ----------------------------------------------------------------------

    def _ad(self, user: str, method: str) -> bytes:
        return f"gw-credential-v1\0{user}\0{method}".encode()

    def _seal(self, user: str, method: str, data: dict[str, Any]) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, json.dumps(data).encode(), self._ad(user, method))

    def _unseal(self, user: str, method: str, sealed: bytes) -> dict[str, Any]:
        try:
            plain = self._aead.decrypt(sealed[:12], sealed[12:], self._ad(user, method))
        except InvalidTag as exc:
            raise StoreError(f"credential {method} of {user} does not unseal") from exc
        data: dict[str, Any] = json.loads(plain)
        return data

    def set_credential(
        self,
        user: str,
        method: str,
        data: dict[str, Any],
        now: float,
        *,
        reset_counters: bool = False,
    ) -> int:
        """Write the user's whole ``method`` record, whatever it was; its new version.

        For an administrator's decision (a new password, a new TOTP seed): any login
        that verified against the old record then fails at its conditional update.
        ``reset_counters`` forgets the forward-only counters (a new TOTP secret starts
        with no step used).
        """
        self._require("users", user)
        sealed = self._seal(user, method, data)
        with self.tx() as db:
            row = db.execute(
                "INSERT INTO credentials (user, method, sealed, updated) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (user, method) DO UPDATE SET sealed = excluded.sealed, "
                "updated = excluded.updated, version = credentials.version + 1 "
                "RETURNING version",
                (user, method, sealed, now),
            ).fetchone()
            if reset_counters:
                db.execute(
                    "DELETE FROM factor_counters WHERE user = ? AND method = ?", (user, method)
                )
        return int(row["version"])

    def replace_credential(
        self,
        user: str,
        method: str,
        data: dict[str, Any],
        version: int,
        now: float,
        *,
        drop_counters: tuple[str, ...] = (),
    ) -> bool:
        """Write a record made from version ``version``; False if the row moved on (or is
        gone). ``drop_counters``: the counters of entries the new record no longer has."""
        sealed = self._seal(user, method, data)
        with self.tx() as db:
            cur = db.execute(
                "UPDATE credentials SET sealed = ?, updated = ?, version = version + 1 "
                "WHERE user = ? AND method = ? AND version = ?",
                (sealed, now, user, method, version),
            )
            if cur.rowcount == 1:
                db.executemany(
                    "DELETE FROM factor_counters WHERE user = ? AND method = ? AND key = ?",
                    [(user, method, key) for key in drop_counters],
                )
        return cur.rowcount == 1

    def add_credential(self, user: str, method: str, data: dict[str, Any], now: float) -> bool:
        """Write a first ``method`` record; False if the user has one already."""
        self._require("users", user)
        sealed = self._seal(user, method, data)
        with self.tx() as db:
            cur = db.execute(
                "INSERT INTO credentials (user, method, sealed, updated) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (user, method) DO NOTHING",
                (user, method, sealed, now),
            )
        return cur.rowcount == 1

    def advance_counter(
        self, user: str, method: str, key: str, value: int, *, version: int, now: float
    ) -> bool:
        """Raise counter ``key`` to ``value``, only if it is below ``value`` now. False: a
        replay, or a concurrent change (the login must fail).

        The record-wide counter ``""`` (TOTP's step) moves only while the credential is
        still version ``version``: a code of a replaced secret never counts. A counter
        named after an entry of the record (a FIDO2 key id) exists from that entry's
        first use until the entry is removed (:meth:`replace_credential` drops it), so
        while it exists it alone decides, and a key added or removed meanwhile does not
        fail a login with another key; its first use needs the version read. ``value``
        0 is a key that keeps no counter: it must exist, nothing moves.
        """
        with self.tx() as db:
            current = db.execute(
                "SELECT counter FROM factor_counters WHERE user = ? AND method = ? AND key = ?",
                (user, method, key),
            ).fetchone()
            if key and current is not None:
                if value == 0:
                    return int(current["counter"]) == 0
                cur = db.execute(
                    "UPDATE factor_counters SET counter = ?, updated = ? "
                    "WHERE user = ? AND method = ? AND key = ? AND counter < ?",
                    (value, now, user, method, key, value),
                )
                return cur.rowcount == 1
            row = db.execute(
                "SELECT version FROM credentials WHERE user = ? AND method = ?", (user, method)
            ).fetchone()
            if row is None or row["version"] != version:
                return False
            cur = db.execute(
                "INSERT INTO factor_counters VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (user, method, key) DO UPDATE SET counter = excluded.counter, "
                "updated = excluded.updated WHERE factor_counters.counter < excluded.counter",
                (user, method, key, value, now),
            )
        return cur.rowcount == 1

    def load_credential(self, user: str, method: str) -> Credential | None:
        """The record, its version and its counters, read in one snapshot."""
        with self.tx() as db:
            row = db.execute(
                "SELECT sealed, version FROM credentials WHERE user = ? AND method = ?",
                (user, method),
            ).fetchone()
            if row is None:
                return None
            rows = db.execute(
                "SELECT key, counter, updated FROM factor_counters WHERE user = ? AND method = ?",
                (user, method),
            ).fetchall()
        data = self._unseal(user, method, bytes(row["sealed"]))
        counters = {r["key"]: int(r["counter"]) for r in rows}
        moved = {r["key"]: float(r["updated"]) for r in rows}
        return Credential(data, int(row["version"]), counters, moved)

    def credential_version(self, user: str, method: str) -> int | None:
        """The credential's version now (None: there is none)."""
        row = self._one(
            "SELECT version FROM credentials WHERE user = ? AND method = ?", user, method
        )
        return None if row is None else int(row["version"])

    def get_credential(self, user: str, method: str) -> dict[str, Any] | None:
        row = self._one(
            "SELECT sealed FROM credentials WHERE user = ? AND method = ?", user, method
        )
        if row is None:
            return None
        return self._unseal(user, method, bytes(row["sealed"]))

    def credential_methods(self, user: str) -> list[str]:
        rows = self.db.execute("SELECT method FROM credentials WHERE user = ?", (user,))
        return [r["method"] for r in rows]

    def delete_credential(self, user: str, method: str, version: int | None = None) -> bool:
        """Forget the user's ``method`` credential (only version ``version`` if given);
        False if there was none (or it moved on)."""
        sql = "DELETE FROM credentials WHERE user = ? AND method = ?"
        args: tuple[Any, ...] = (user, method)
        if version is not None:
            sql, args = sql + " AND version = ?", (*args, version)
        with self.tx() as db:
            cur = db.execute(sql, args)
        return cur.rowcount > 0

    # -- one-time registration codes ----------------------------------------------------

    def add_registration_code(
        self, user: str, method: str, code: str, *, expires: float, by: str, now: float
    ) -> None:
        """Keep a one-time code (its hash only) for ``user`` to register a ``method`` credential."""
        self._require("users", user)
        self._insert(
            "registration code",
            "INSERT INTO registration_codes "
            "(code_hash, user, method, created, expires, created_by) VALUES (?, ?, ?, ?, ?, ?)",
            token_hash(code),
            user,
            method,
            now,
            expires,
            by,
        )

    def registration_code_state(self, user: str, method: str, code: str, now: float) -> str:
        """``"valid"``, ``"used"``, ``"expired"`` or ``"unknown"`` (also: another user's code)."""
        row = self._one(
            "SELECT user, method, expires, used FROM registration_codes WHERE code_hash = ?",
            token_hash(code),
        )
        if row is None or row["user"] != user or row["method"] != method:
            return "unknown"
        if row["used"] is not None:
            return "used"
        return "expired" if row["expires"] < now else "valid"

    def take_registration_code(self, user: str, method: str, code: str, now: float) -> bool:
        """Mark a valid code used (once: a second call, or a concurrent one, gets False)."""
        with self.tx() as db:
            cur = db.execute(
                "UPDATE registration_codes SET used = ? WHERE code_hash = ? AND user = ? "
                "AND method = ? AND used IS NULL AND expires >= ?",
                (now, token_hash(code), user, method, now),
            )
        return cur.rowcount == 1

    # -- agents -------------------------------------------------------------------------

    def add_agent(self, agent: str, org: str, token: str, expires: float, now: float) -> None:
        self._require("orgs", org)
        self._insert(
            f"agent {agent!r}",
            "INSERT INTO agents (id, org, created, token_hash, token_expires) "
            "VALUES (?, ?, ?, ?, ?)",
            agent,
            org,
            now,
            token_hash(token),
            expires,
        )

    def agent_for_token(self, token: str, now: float) -> str | None:
        """The agent a valid (unused, unexpired, not disabled) enrollment token is for."""
        row = self._one(
            "SELECT id FROM agents WHERE token_hash = ? AND token_expires >= ? AND disabled = 0",
            token_hash(token),
            now,
        )
        return None if row is None else str(row["id"])

    def take_enrollment(
        self,
        token: str,
        fingerprint: str,
        noise_key: str,
        now: float,
        pq_key: str | None = None,
    ) -> str | None:
        """Consume a valid enrollment token; record the agent's keys. Returns the agent id.

        ``pq_key`` is the agent's ML-KEM-768 public key; enrolling again replaces both keys.
        """
        with self.tx() as db:
            row = db.execute(
                "SELECT id, token_expires, disabled FROM agents WHERE token_hash = ?",
                (token_hash(token),),
            ).fetchone()
            if row is None or row["disabled"] or (row["token_expires"] or 0) < now:
                return None
            db.execute(
                "UPDATE agents SET token_hash = NULL, token_expires = NULL, "
                "cert_fingerprint = ?, noise_key = ?, pq_key = ?, enrolled = ? WHERE id = ?",
                (fingerprint, noise_key, pq_key, now, row["id"]),
            )
            return str(row["id"])

    def get_agent(self, agent: str) -> Agent | None:
        row = self._one("SELECT * FROM agents WHERE id = ?", agent)
        if row is None:
            return None
        return Agent(
            row["id"],
            row["org"],
            bool(row["disabled"]),
            row["enrolled"] is not None,
            row["cert_fingerprint"],
            row["noise_key"],
            row["token_expires"],
            row["last_seen"],
            row["pq_key"],
        )

    def touch_agent(self, agent: str, now: float) -> None:
        with self.tx() as db:
            db.execute("UPDATE agents SET last_seen = ? WHERE id = ?", (now, agent))

    # -- agreements ---------------------------------------------------------------------

    def add_agreement(
        self,
        agreement: str,
        *,
        vendor: str,
        org: str,
        modes: tuple[str, ...],
        unattended: bool,
        valid_from: float | None,
        valid_until: float | None,
        accepted: bool,
        now: float,
    ) -> None:
        self._require("vendors", vendor)
        self._require("orgs", org)
        stamp = now if accepted else None
        self._insert(
            f"agreement {agreement!r}",
            "INSERT INTO agreements (id, vendor, org, modes, unattended, valid_from, "
            "valid_until, state, vendor_accepted, org_accepted, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 'active', ?, ?, ?)",
            agreement,
            vendor,
            org,
            ",".join(modes),
            int(unattended),
            valid_from,
            valid_until,
            stamp,
            stamp,
            now,
        )

    def agreements_between(self, vendor: str, org: str) -> list[Agreement]:
        rows = self.db.execute(
            "SELECT * FROM agreements WHERE vendor = ? AND org = ? ORDER BY id", (vendor, org)
        )
        return [_agreement(r) for r in rows]

    def grants_of(self, user: str) -> set[str]:
        rows = self.db.execute("SELECT agent FROM grants WHERE user = ?", (user,))
        return {r["agent"] for r in rows}

    # -- lifecycle: disable, enable, remove; agreements; grants ----------------------------

    _DISABLEABLE = ("users", "vendors", "agents", "orgs")

    def set_disabled(self, table: str, ident: str, disabled: bool) -> None:
        assert table in self._DISABLEABLE
        self._require(table, ident)
        with self.tx() as db:
            db.execute(
                f"UPDATE {table} SET disabled = ? WHERE id = ?",  # noqa: S608 - fixed names
                (int(disabled), ident),
            )

    def remove(self, table: str, ident: str) -> None:
        """Delete a row; StoreError if others still refer to it."""
        assert table in (*self._DISABLEABLE, "agreements")
        self._require(table, ident)
        try:
            with self.tx() as db:
                db.execute(f"DELETE FROM {table} WHERE id = ?", (ident,))  # noqa: S608
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"{table[:-1]} {ident!r} is still referred to; disable it") from exc

    def get_agreement(self, agreement: str) -> Agreement | None:
        row = self._one("SELECT * FROM agreements WHERE id = ?", agreement)
        return None if row is None else _agreement(row)

    def accept_agreement(self, agreement: str, side: str, now: float) -> None:
        assert side in ("vendor", "org")
        self._require("agreements", agreement)
        with self.tx() as db:
            db.execute(
                f"UPDATE agreements SET {side}_accepted = ? WHERE id = ?",  # noqa: S608
                (now, agreement),
            )

    def set_agreement_state(self, agreement: str, state: str) -> None:
        assert state in ("active", "suspended")
        self._require("agreements", agreement)
        with self.tx() as db:
            db.execute("UPDATE agreements SET state = ? WHERE id = ?", (state, agreement))

    def set_source_networks(self, vendor: str, networks: list[str]) -> None:
        self._require("vendors", vendor)
        with self.tx() as db:
            db.execute(
                "UPDATE vendors SET source_networks = ? WHERE id = ?",
                (json.dumps(networks), vendor),
            )

    def source_networks(self, vendor: str) -> list[str]:
        """CIDRs a vendor's users may log in from; empty: anywhere."""
        row = self._one("SELECT source_networks FROM vendors WHERE id = ?", vendor)
        return _networks(row["source_networks"]) if row else []

    def vendor_name(self, vendor: str) -> str:
        row = self._one("SELECT name FROM vendors WHERE id = ?", vendor)
        return str(row["name"]) if row else vendor

    def add_grant(self, user: str, agent: str, now: float) -> None:
        self._require("users", user)
        self._require("agents", agent)
        self._insert(
            f"grant of {agent!r} to {user!r}",
            "INSERT INTO grants VALUES (?, ?, ?)",
            user,
            agent,
            now,
        )

    def remove_grant(self, user: str, agent: str) -> bool:
        with self.tx() as db:
            cur = db.execute("DELETE FROM grants WHERE user = ? AND agent = ?", (user, agent))
        return cur.rowcount > 0


def _agreement(r: sqlite3.Row) -> Agreement:
    return Agreement(
        r["id"],
        r["vendor"],
        r["org"],
        tuple(m for m in r["modes"].split(",") if m),
        bool(r["unattended"]),
        r["valid_from"],
        r["valid_until"],
        r["state"],
        r["vendor_accepted"],
        r["org_accepted"],
    )


def _networks(text: str | None) -> list[str]:
    data = json.loads(text or "[]")
    return [str(n) for n in data] if isinstance(data, list) else []
