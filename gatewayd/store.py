"""The directory: orgs, vendors, users, factor credentials, agents, agreements, grants.

SQLite in WAL mode. The daemon is the only writer (``gw admin`` goes through its
admin socket). Factor credentials are stored sealed with AES-256-GCM under the key
in ``store.secrets_key_file``, with the user and factor name as associated data,
so a copy of the database alone reveals no TOTP seed and a sealed blob cannot be
moved to another user.

All methods are synchronous and short; they run on the event loop thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from relay.errors import GatewayError

SCHEMA_VERSION = 1

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
    failures INTEGER NOT NULL DEFAULT 0, locked_until REAL NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS credentials (
    user TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE, method TEXT NOT NULL,
    sealed BLOB NOT NULL, updated REAL NOT NULL, PRIMARY KEY (user, method));
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY, org TEXT NOT NULL REFERENCES orgs(id), created REAL NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0,
    token_hash TEXT, token_expires REAL,
    cert_fingerprint TEXT, noise_key TEXT, enrolled REAL, last_seen REAL);
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
        self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
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
            "last_seen, token_expires",
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
        )

    def record_failure(self, user: str, locked_until: float | None) -> int:
        """Count a failed login; set a lock if given. Returns the new failure count."""
        with self.tx() as db:
            db.execute("UPDATE users SET failures = failures + 1 WHERE id = ?", (user,))
            if locked_until is not None:
                db.execute("UPDATE users SET locked_until = ? WHERE id = ?", (locked_until, user))
        row = self._one("SELECT failures FROM users WHERE id = ?", user)
        return int(row["failures"]) if row else 0

    def record_success(self, user: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE users SET failures = 0, locked_until = 0 WHERE id = ?", (user,))

    def _ad(self, user: str, method: str) -> bytes:
        return f"gw-credential-v1\0{user}\0{method}".encode()

    def set_credential(self, user: str, method: str, data: dict[str, Any], now: float) -> None:
        self._require("users", user)
        nonce = os.urandom(12)
        sealed = nonce + self._aead.encrypt(
            nonce, json.dumps(data).encode(), self._ad(user, method)
        )
        with self.tx() as db:
            db.execute(
                "INSERT INTO credentials VALUES (?, ?, ?, ?) "
                "ON CONFLICT (user, method) DO UPDATE SET sealed = excluded.sealed, "
                "updated = excluded.updated",
                (user, method, sealed, now),
            )

    def get_credential(self, user: str, method: str) -> dict[str, Any] | None:
        row = self._one(
            "SELECT sealed FROM credentials WHERE user = ? AND method = ?", user, method
        )
        if row is None:
            return None
        sealed = bytes(row["sealed"])
        try:
            plain = self._aead.decrypt(sealed[:12], sealed[12:], self._ad(user, method))
        except InvalidTag as exc:
            raise StoreError(f"credential {method} of {user} does not unseal") from exc
        data: dict[str, Any] = json.loads(plain)
        return data

    def credential_methods(self, user: str) -> list[str]:
        rows = self.db.execute("SELECT method FROM credentials WHERE user = ?", (user,))
        return [r["method"] for r in rows]

    def delete_credential(self, user: str, method: str) -> bool:
        """Forget the user's credential of ``method``; False if there was none."""
        with self.tx() as db:
            cur = db.execute(
                "DELETE FROM credentials WHERE user = ? AND method = ?", (user, method)
            )
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
        self, token: str, fingerprint: str, noise_key: str, now: float
    ) -> str | None:
        """Consume a valid enrollment token; record the agent's keys. Returns the agent id."""
        with self.tx() as db:
            row = db.execute(
                "SELECT id, token_expires, disabled FROM agents WHERE token_hash = ?",
                (token_hash(token),),
            ).fetchone()
            if row is None or row["disabled"] or (row["token_expires"] or 0) < now:
                return None
            db.execute(
                "UPDATE agents SET token_hash = NULL, token_expires = NULL, "
                "cert_fingerprint = ?, noise_key = ?, enrolled = ? WHERE id = ?",
                (fingerprint, noise_key, now, row["id"]),
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
