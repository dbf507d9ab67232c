"""The directory: orgs, vendors, users, factor credentials, agents, agreements, grants.

One interface, two backends: SQLite in WAL mode for a gateway alone (the daemon is
its only writer; ``gw admin`` goes through its admin socket), PostgreSQL for a
cluster (``[cluster] database``), where every node reads and changes the same rows.
Factor credentials are stored sealed with AES-256-GCM under the key in
``store.secrets_key_file``, with the user and factor name as associated data, so a
copy of the database alone reveals no TOTP seed and a sealed blob cannot be moved to
another user.

Every method is a coroutine. Each query is written once, for both backends: ``?`` and
``:name`` placeholders (rewritten for psycopg), ``GREATEST`` (a function the SQLite
backend adds), ``ON CONFLICT`` and ``RETURNING`` (both speak them), ``"user"`` quoted
(a reserved word in PostgreSQL). The SQLite backend runs each statement inline on the
event loop thread, one transaction or read at a time (a lock), and each commit in a
thread of its own: a read takes under 0.1 ms, a commit's fsync
milliseconds, which the event loop (and every tunnel it splices) does not wait for.
The PostgreSQL backend takes a connection from a pool for each transaction.

State that logins change moves only by atomic conditional updates, never by writing
back a copy read before an ``await`` (nor, on PostgreSQL, by another node's copy):

- each credential row carries a ``version``; a whole-record write made from a copy
  (an admin's re-enrollment, a key added or removed, a password rehashed) names the
  version it was made from and fails if the row moved on meanwhile
  (``UPDATE ... WHERE version = ?``);
- counters that only go forward (TOTP's last accepted step, each FIDO2 key's signature
  counter) live in ``factor_counters``, one row per (user, factor, key), outside the
  sealed record: a login raises one with ``... WHERE counter < ?``, so a replayed code
  or a cloned key's old count fails. TOTP's step moves only while the credential is
  still the version the login verified against (a code of a replaced seed never
  counts: the credential row is held by ``UPDATE ... WHERE version = ?`` in the same
  transaction); a key's counter row exists from its first use until the key is
  removed, and decides alone while it exists (another key added meanwhile fails no
  login);
- the lockout: :meth:`Store.begin_attempt` takes a slot for one factor check only
  while the account is unlocked and fewer checks are in flight than failures are left
  before the lock; :meth:`Store.end_attempt` counts the outcome and decides the lock in
  the same transaction. So parallel connections (on any node) get no more guesses
  than one;
- enrollment tokens and registration codes are taken by one ``UPDATE ... WHERE`` still
  valid ``RETURNING``: once, whichever node asks.

A database that cannot be reached (PostgreSQL down, a pool with no connection within
:data:`POOL_WAIT` seconds) raises :class:`StoreError` saying so; the pool reconnects
on its own when the server is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import math
import os
import re
import sqlite3
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

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
    admin_locked INTEGER NOT NULL DEFAULT 0, pending_since REAL NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS credentials (
    "user" TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE, method TEXT NOT NULL,
    sealed BLOB NOT NULL, updated REAL NOT NULL, version INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY ("user", method));
CREATE TABLE IF NOT EXISTS factor_counters (
    "user" TEXT NOT NULL, method TEXT NOT NULL, key TEXT NOT NULL,
    counter INTEGER NOT NULL, updated REAL NOT NULL, PRIMARY KEY ("user", method, key),
    FOREIGN KEY ("user", method) REFERENCES credentials("user", method) ON DELETE CASCADE);
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
    "user" TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    agent TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    created REAL NOT NULL, PRIMARY KEY ("user", agent));
CREATE TABLE IF NOT EXISTS registration_codes (
    code_hash TEXT PRIMARY KEY,
    "user" TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE, method TEXT NOT NULL,
    created REAL NOT NULL, expires REAL NOT NULL, created_by TEXT NOT NULL, used REAL);
CREATE TABLE IF NOT EXISTS login_credentials (
    id TEXT PRIMARY KEY,
    "user" TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE, mode TEXT NOT NULL,
    public_key TEXT NOT NULL, session TEXT NOT NULL, source TEXT NOT NULL,
    created REAL NOT NULL, expires REAL NOT NULL, idle_timeout REAL NOT NULL,
    last_used REAL NOT NULL, ended REAL, ended_reason TEXT);
"""

#: Columns added since schema 1: (table, column, definition), added by ALTER TABLE.
_ADDED_COLUMNS = (
    ("users", "last_failure", "REAL NOT NULL DEFAULT 0"),
    ("users", "pending", "INTEGER NOT NULL DEFAULT 0"),
    ("users", "admin_locked", "INTEGER NOT NULL DEFAULT 0"),
    ("credentials", "version", "INTEGER NOT NULL DEFAULT 1"),
    ("agents", "pq_key", "TEXT"),
    ("users", "pending_since", "REAL NOT NULL DEFAULT 0"),
)


class StoreError(GatewayError):
    """A directory operation failed: unknown or duplicate id, bad reference."""


class StoreUnavailable(StoreError):
    """The database cannot be reached or failed (PostgreSQL down): nothing was changed
    that the caller can rely on; a login must fail, and may be tried again later."""


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
    slot_lease: float = 120.0
    """Seconds after which the slots of checks in flight count as abandoned (a node
    that died during a check never gave its slot back): longer than any check runs."""

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


# -- the backends ---------------------------------------------------------------------------

POOL_SIZE = 10
"""Connections a node keeps to PostgreSQL at most: a transaction holds one for a few
milliseconds, so ten serve hundreds of logins a second; a server's default
``max_connections`` (100) leaves room for several nodes."""

POOL_MIN = 4
"""Connections a node keeps open even when idle: parallel logins find them ready."""

POOL_WAIT = 3.0
"""Seconds a store call waits for a PostgreSQL connection before it fails: long enough
for a pool to replace connections a restarted server dropped, short enough that a
login during an outage fails with a clear error well before the client gives up."""

CONNECT_TIMEOUT = 3
"""Seconds one connection attempt to PostgreSQL may take (libpq's ``connect_timeout``)."""

RECONNECT_GIVE_UP = 5.0
"""Seconds the pool retries one lost connection (after 1 s, 2 s, then 2 s: never a gap
longer than :data:`POOL_WAIT`) before it gives the slot up; the next store call then
connects at once (psycopg_pool's default, 300 s of doubling delays, left a node
refusing logins for up to minutes after the server had returned)."""

POOL_CHECK_EVERY = 2.0
"""Seconds between checks of the pool's idle connections: those a server that went
away broke are replaced then, not handed to a login after it is back (the pool tries
them one by one, 1 s, 2 s, 4 s apart, and the login would time out first)."""


class Result:
    """What one statement gave: its rows (as dicts) and how many rows it touched."""

    __slots__ = ("rowcount", "rows")

    def __init__(self, rows: list[dict[str, Any]], rowcount: int) -> None:
        self.rows = rows
        self.rowcount = rowcount

    def one(self) -> dict[str, Any] | None:
        return self.rows[0] if self.rows else None


class Tx:
    """Statements inside one transaction (or, from :meth:`Backend.read`, one read)."""

    async def execute(
        self, sql: str, args: Sequence[Any] | Mapping[str, Any] = ()
    ) -> Result:  # pragma: no cover - each backend has its own
        raise NotImplementedError


class _Conflict(Exception):
    """A statement broke a constraint; ``unique``: a key that exists already."""

    def __init__(self, unique: bool, message: str) -> None:
        super().__init__(message)
        self.unique = unique


class Backend:
    """Where the rows live: transactions, reads, and closing."""

    name = ""

    def tx(self, *, snapshot: bool = False) -> AbstractAsyncContextManager[Tx]:
        """One transaction; ``snapshot``: its reads see one state of the database."""
        raise NotImplementedError  # pragma: no cover

    def read(self) -> AbstractAsyncContextManager[Tx]:
        """Reads outside a write transaction."""
        raise NotImplementedError  # pragma: no cover

    async def close(self) -> None:
        raise NotImplementedError  # pragma: no cover


class _SqliteTx(Tx):
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    async def execute(self, sql: str, args: Sequence[Any] | Mapping[str, Any] = ()) -> Result:
        try:
            cur = self.db.execute(sql, args)
            rows = [dict(r) for r in cur.fetchall()]
        except sqlite3.IntegrityError as exc:
            msg = str(exc)
            raise _Conflict("UNIQUE" in msg or "PRIMARY KEY" in msg, msg) from exc
        except sqlite3.Error as exc:
            raise StoreError(f"the state database failed: {exc}") from exc
        return Result(rows, cur.rowcount)


def _greatest(*values: Any) -> Any:
    return max(values)


class Sqlite(Backend):
    """One SQLite file in WAL mode; one connection, used inline on the event loop but for
    each commit, whose fsync (milliseconds) runs in a thread of its own.

    A lock keeps the connection to one transaction or read at a time: a transaction's
    statements run without a pause, and nothing else uses the connection until its
    commit has returned. Inside a transaction use only the ``db`` it gives: a store
    method called there would wait for that lock forever.
    """

    name = "sqlite"

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the state database {path}: {exc}") from exc
        self.db.row_factory = sqlite3.Row
        self.db.create_function("greatest", -1, _greatest, deterministic=True)
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
        self._tx = _SqliteTx(self.db)
        self._lock = asyncio.Lock()
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="gatewayd-sqlite-commit")

    @asynccontextmanager
    async def tx(self, *, snapshot: bool = False) -> AsyncIterator[Tx]:
        async with self._lock:
            # BEGIN IMMEDIATE: the write lock from the start, so every transaction is
            # serialised (and so a snapshot too).
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self._tx
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            await self._commit()

    async def _commit(self) -> None:
        """COMMIT in the committer thread; the lock is held until it has returned, even
        when the caller is cancelled meanwhile."""
        done = asyncio.get_running_loop().run_in_executor(self._committer, self._commit_now)
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await done
            raise

    def _commit_now(self) -> None:
        try:
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            raise StoreError(f"the state database failed: {exc}") from exc

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Tx]:
        async with self._lock:
            yield self._tx

    async def close(self) -> None:
        self._committer.shutdown(wait=True)
        self.db.close()


#: ``?`` and ``:name`` placeholders as psycopg writes them (``%s``, ``%(name)s``).
_PLACEHOLDER = re.compile(r"\?|(?<![:\w]):([A-Za-z_]\w*)")


@functools.lru_cache(maxsize=512)
def postgres_sql(sql: str) -> str:
    """One query text as PostgreSQL (psycopg) takes it."""

    def placeholder(m: re.Match[str]) -> str:
        return "%s" if m.group(0) == "?" else f"%({m.group(1)})s"

    return _PLACEHOLDER.sub(placeholder, sql.replace("%", "%%"))


#: Column types of the schema as PostgreSQL spells them (REAL is 4 bytes there).
_POSTGRES_TYPES = {"REAL": "DOUBLE PRECISION", "INTEGER": "BIGINT", "BLOB": "BYTEA"}


def _postgres_ddl(sql: str) -> str:
    return re.sub(r"\b(REAL|INTEGER|BLOB)\b", lambda m: _POSTGRES_TYPES[m.group(1)], sql)


#: Taken while a node creates or upgrades the schema, so nodes that start at once wait
#: for each other (an arbitrary constant: "gatewayd" in ASCII).
_SCHEMA_LOCK = 0x6761746577617964


def safe_dsn(dsn: str) -> str:
    """The DSN without its password, for messages and logs."""
    dsn = re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", dsn)
    return re.sub(r"(password\s*=\s*)\S+", r"\1***", dsn)


class _PostgresTx(Tx):
    def __init__(self, cur: Any) -> None:
        self.cur = cur

    async def execute(self, sql: str, args: Sequence[Any] | Mapping[str, Any] = ()) -> Result:
        import psycopg

        try:
            await self.cur.execute(postgres_sql(sql), args)
            rows = await self.cur.fetchall() if self.cur.description else []
        except psycopg.IntegrityError as exc:
            unique = isinstance(exc, psycopg.errors.UniqueViolation)
            raise _Conflict(unique, exc.diag.message_primary or str(exc)) from exc
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"the database failed: {_first_line(exc)}") from exc
        return Result(rows, self.cur.rowcount)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Postgres(Backend):
    """A PostgreSQL database shared by the nodes of a cluster, through a connection pool."""

    name = "postgresql"

    def __init__(self, pool: AsyncConnectionPool[Any], dsn: str) -> None:
        self.pool = pool
        self.where = safe_dsn(dsn)
        self._checker: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, dsn: str, *, wait: float = 10.0) -> Postgres:
        """Connect (waiting up to ``wait`` seconds) and create or upgrade the schema."""
        try:
            from psycopg_pool import AsyncConnectionPool, PoolTimeout
        except ImportError as exc:
            raise StoreError(
                "[cluster] database needs psycopg and psycopg-pool "
                "(pip install 'gatewayd[cluster]')"
            ) from exc
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            dsn,
            min_size=POOL_MIN,
            max_size=POOL_SIZE,
            open=False,
            timeout=POOL_WAIT,
            reconnect_timeout=RECONNECT_GIVE_UP,
            check=AsyncConnectionPool.check_connection,
            kwargs={"connect_timeout": CONNECT_TIMEOUT, "application_name": "gatewayd"},
            name="gatewayd-store",
        )
        self = cls(pool, dsn)
        try:
            await pool.open(wait=True, timeout=wait)
        except PoolTimeout as exc:
            await pool.close()
            raise StoreUnavailable(
                f"cannot reach the database {self.where} within {wait:g} s"
            ) from exc
        except Exception as exc:
            await pool.close()
            raise StoreError(f"cannot use the database {self.where}: {_first_line(exc)}") from exc
        try:
            await self._schema()
        except BaseException:
            await pool.close()
            raise
        self._checker = asyncio.get_running_loop().create_task(self._keep_checked())
        return self

    async def _keep_checked(self) -> None:
        while True:
            await asyncio.sleep(POOL_CHECK_EVERY)
            with contextlib.suppress(Exception):  # the pool logs what it finds
                await self.pool.check()

    async def _schema(self) -> None:
        async with self.tx() as db:
            await db.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))
            await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
            row = (await db.execute("SELECT MAX(version) AS v FROM schema_version")).one()
            version = row["v"] if row and row["v"] is not None else None
            if version is not None and version > SCHEMA_VERSION:
                raise StoreError(
                    f"the database {self.where} has schema {version}, "
                    "newer than this gatewayd knows"
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    await db.execute(_postgres_ddl(statement))
            for table, column, definition in _ADDED_COLUMNS:
                await db.execute(
                    f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} "
                    f"{_postgres_ddl(definition)}"
                )
            await db.execute("DELETE FROM schema_version")
            await db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))

    @asynccontextmanager
    async def tx(self, *, snapshot: bool = False) -> AsyncIterator[Tx]:
        import psycopg
        from psycopg.rows import dict_row
        from psycopg_pool import PoolTimeout

        try:
            async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
                if snapshot:
                    await cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                yield _PostgresTx(cur)
        except PoolTimeout as exc:
            raise StoreUnavailable(
                f"the database {self.where} is unreachable (no connection within {POOL_WAIT:g} s)"
            ) from exc
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"the database {self.where} failed: {_first_line(exc)}") from exc

    def read(self) -> AbstractAsyncContextManager[Tx]:
        return self.tx()

    async def close(self) -> None:
        if self._checker is not None:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checker
        await self.pool.close()


class Store:
    """The directory, on SQLite (a path) or PostgreSQL (a :class:`Postgres` backend).

    ``Store(path, key)`` opens SQLite at once; :meth:`open` takes either and is how the
    daemon opens the one its config names. One instance per process.
    """

    def __init__(self, where: Path | Backend, secrets_key: bytes) -> None:
        self.backend: Backend = where if isinstance(where, Backend) else Sqlite(where)
        self._aead = AESGCM(secrets_key)

    @classmethod
    async def open(cls, where: Path | str, secrets_key: bytes, *, wait: float = 10.0) -> Store:
        """SQLite at a path, or PostgreSQL at a DSN (``postgresql://...``), waiting up to
        ``wait`` seconds for its first connection."""
        if isinstance(where, str):
            return cls(await Postgres.open(where, wait=wait), secrets_key)
        return cls(where, secrets_key)

    async def close(self) -> None:
        await self.backend.close()

    def tx(self, *, snapshot: bool = False) -> AbstractAsyncContextManager[Tx]:
        """One transaction on the backend (for queries this class does not have)."""
        return self.backend.tx(snapshot=snapshot)

    async def _one(self, sql: str, *args: Any) -> dict[str, Any] | None:
        async with self.backend.read() as db:
            return (await db.execute(sql, args)).one()

    async def _all(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        async with self.backend.read() as db:
            return (await db.execute(sql, args)).rows

    async def _write(self, sql: str, *args: Any) -> int:
        """One statement in its own transaction; the rows it touched."""
        async with self.backend.tx() as db:
            return (await db.execute(sql, args)).rowcount

    async def _insert(self, what: str, sql: str, *args: Any) -> None:
        try:
            await self._write(sql, *args)
        except _Conflict as exc:
            if exc.unique:
                raise StoreError(f"{what} already exists") from exc
            raise StoreError(f"{what}: {exc}") from exc

    async def _require(self, table: str, ident: str) -> None:
        if await self._one(f"SELECT 1 FROM {table} WHERE id = ?", ident) is None:  # noqa: S608
            raise StoreError(f"no {table[:-1]} {ident!r}")

    # -- orgs and vendors -------------------------------------------------------------

    async def add_org(self, org: str, name: str, now: float) -> None:
        await self._insert(f"org {org!r}", "INSERT INTO orgs VALUES (?, ?, ?, 0)", org, name, now)

    async def add_vendor(self, vendor: str, name: str, now: float) -> None:
        await self._insert(
            f"vendor {vendor!r}",
            "INSERT INTO vendors (id, name, created) VALUES (?, ?, ?)",
            vendor,
            name,
            now,
        )

    async def list_rows(self, table: str, ident: str | None = None) -> list[dict[str, Any]]:
        """Rows of a table for ``gw admin`` (secrets left out); only ``ident``'s if given."""
        assert table in ("orgs", "vendors", "users", "agents", "agreements", "grants")
        cols = {
            "agents": "id, org, created, disabled, cert_fingerprint, noise_key, enrolled, "
            "last_seen, token_expires, CASE WHEN noise_key IS NULL THEN NULL "
            "WHEN pq_key IS NULL THEN 'classic' ELSE 'hybrid' END AS e2e",
        }.get(table, "*")
        where, args = ("WHERE id = ?", (ident,)) if ident is not None else ("", ())
        sql = f"SELECT {cols} FROM {table} {where} ORDER BY 1"  # noqa: S608 - fixed names
        return await self._all(sql, *args)

    async def vendor_disabled(self, vendor: str) -> bool | None:
        row = await self._one("SELECT disabled FROM vendors WHERE id = ?", vendor)
        return None if row is None else bool(row["disabled"])

    async def org_disabled(self, org: str) -> bool:
        row = await self._one("SELECT disabled FROM orgs WHERE id = ?", org)
        return row is None or bool(row["disabled"])

    async def org_exists(self, org: str) -> bool:
        return await self._one("SELECT 1 FROM orgs WHERE id = ?", org) is not None

    # -- users and credentials ----------------------------------------------------------

    async def add_user(
        self, user: str, *, kind: str, vendor: str | None, org: str | None, now: float
    ) -> None:
        if vendor is not None:
            await self._require("vendors", vendor)
        if org is not None:
            await self._require("orgs", org)
        await self._insert(
            f"user {user!r}",
            "INSERT INTO users (id, kind, vendor, org, created) VALUES (?, ?, ?, ?, ?)",
            user,
            kind,
            vendor,
            org,
            now,
        )

    async def get_user(self, user: str) -> User | None:
        row = await self._one("SELECT * FROM users WHERE id = ?", user)
        if row is None:
            return None
        return User(
            row["id"],
            row["kind"],
            row["vendor"],
            row["org"],
            bool(row["disabled"]),
            int(row["failures"]),
            float(row["locked_until"]),
            bool(row["admin_locked"]),
        )

    # -- the lockout ----------------------------------------------------------------------

    #: Consecutive failures after decay: one forgiven per full ``decay`` seconds since the
    #: last failure (a clock that went back forgives nothing).
    _DECAYED = (
        "GREATEST(0, failures - CAST(FLOOR(GREATEST(0, :now - last_failure) / :decay) AS INTEGER))"
    )

    #: Checks in flight, without the slots of an expired lease (abandoned by a dead node).
    _LIVE = "(CASE WHEN pending_since < :now - :lease THEN 0 ELSE pending END)"

    async def begin_attempt(self, user: str, now: float, policy: Lockout) -> Attempt:
        """Take a slot to check one factor of ``user``, or say why not.

        A slot is given only while the account is not locked and fewer checks are in
        flight than failures are left before the lock (at least one once the lock has
        run out), so N parallel connections get no more guesses than one connection.
        Every :attr:`Attempt.GO` must be followed by one :meth:`end_attempt`.

        Slots are leased: when the last one was taken more than ``policy.slot_lease``
        seconds ago, every slot still counted belongs to a check that cannot be running
        any more (a node that crashed mid-check), and this same update frees them all.
        """
        args = {
            "u": user,
            "now": now,
            "decay": policy.decay_seconds,
            "t": policy.threshold,
            "lease": policy.slot_lease,
        }
        async with self.backend.tx() as db:
            taken = await db.execute(
                f"UPDATE users SET pending = {self._LIVE} + 1, pending_since = :now "  # noqa: S608 - fixed expressions
                "WHERE id = :u AND admin_locked = 0 AND locked_until <= :now "
                f"AND {self._LIVE} < GREATEST(1, :t - {self._DECAYED}) RETURNING pending",
                args,
            )
            if taken.one() is not None:
                return Attempt.GO
            state = (
                await db.execute(
                    "SELECT admin_locked, locked_until FROM users WHERE id = ?", (user,)
                )
            ).one()
        if state is None:
            return Attempt.UNKNOWN
        if state["admin_locked"]:
            return Attempt.ADMIN_LOCKED
        if state["locked_until"] > now:
            return Attempt.LOCKED
        return Attempt.BUSY

    async def end_attempt(
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
        async with self.backend.tx() as db:
            if ok:
                row = (
                    await db.execute(
                        "UPDATE users SET pending = GREATEST(pending - 1, 0) WHERE id = :u "
                        "RETURNING failures, locked_until, admin_locked",
                        args,
                    )
                ).one()
                if row is None:
                    return AttemptEnd(0, 0.0, False)
                if final and not row["admin_locked"] and row["locked_until"] <= now:
                    await db.execute(
                        "UPDATE users SET failures = 0, last_failure = 0, locked_until = 0 "
                        "WHERE id = :u",
                        {"u": user},
                    )
                    return AttemptEnd(0, 0.0, False)
                return AttemptEnd(
                    int(row["failures"]), float(row["locked_until"]), bool(row["admin_locked"])
                )
            row = (
                await db.execute(
                    "UPDATE users SET pending = GREATEST(pending - 1, 0), "  # noqa: S608 - a fixed expression
                    f"failures = {self._DECAYED} + 1, last_failure = :now WHERE id = :u "
                    "RETURNING failures, locked_until, admin_locked",
                    args,
                )
            ).one()
            if row is None:
                return AttemptEnd(0, 0.0, False)
            failures = int(row["failures"])
            locked_until, admin_locked = float(row["locked_until"]), bool(row["admin_locked"])
            newly: float | None = None
            if failures >= policy.hard_limit and not admin_locked:
                admin_locked, newly = True, math.inf
                await db.execute("UPDATE users SET admin_locked = 1 WHERE id = :u", {"u": user})
            elif not admin_locked and (seconds := policy.lock_seconds(failures)) > 0:
                locked_until, newly = max(locked_until, now + seconds), seconds
                await db.execute(
                    "UPDATE users SET locked_until = :until WHERE id = :u",
                    {"u": user, "until": locked_until},
                )
        return AttemptEnd(failures, locked_until, admin_locked, newly)

    async def cancel_attempt(self, user: str) -> None:
        """Give back a slot whose check never finished (the connection was cancelled)."""
        await self._write("UPDATE users SET pending = GREATEST(pending - 1, 0) WHERE id = ?", user)

    async def unlock(self, user: str) -> User:
        """Clear the user's failures and locks (``gw admin user unlock``); the user before.

        Slots of checks in flight are freed too: on PostgreSQL a node that died during a
        check (or lost the database in the middle of one) never gave its slot back (the
        next attempt frees it anyway once its lease is over, :attr:`Lockout.slot_lease`).
        """
        before = await self.get_user(user)
        if before is None:
            raise StoreError(f"no user {user!r}")
        await self._write(
            "UPDATE users SET failures = 0, last_failure = 0, locked_until = 0, "
            "admin_locked = 0, pending = 0 WHERE id = ?",
            user,
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

    async def set_credential(
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
        await self._require("users", user)
        sealed = self._seal(user, method, data)
        async with self.backend.tx() as db:
            row = (
                await db.execute(
                    'INSERT INTO credentials ("user", method, sealed, updated) '
                    'VALUES (?, ?, ?, ?) ON CONFLICT ("user", method) DO UPDATE SET '
                    "sealed = excluded.sealed, updated = excluded.updated, "
                    "version = credentials.version + 1 RETURNING version",
                    (user, method, sealed, now),
                )
            ).one()
            if reset_counters:
                await db.execute(
                    'DELETE FROM factor_counters WHERE "user" = ? AND method = ?', (user, method)
                )
        assert row is not None
        return int(row["version"])

    async def replace_credential(
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
        async with self.backend.tx() as db:
            cur = await db.execute(
                "UPDATE credentials SET sealed = ?, updated = ?, version = version + 1 "
                'WHERE "user" = ? AND method = ? AND version = ?',
                (sealed, now, user, method, version),
            )
            if cur.rowcount == 1:
                for key in drop_counters:
                    await db.execute(
                        'DELETE FROM factor_counters WHERE "user" = ? AND method = ? AND key = ?',
                        (user, method, key),
                    )
        return cur.rowcount == 1

    async def add_credential(
        self, user: str, method: str, data: dict[str, Any], now: float
    ) -> bool:
        """Write a first ``method`` record; False if the user has one already."""
        await self._require("users", user)
        sealed = self._seal(user, method, data)
        written = await self._write(
            'INSERT INTO credentials ("user", method, sealed, updated) VALUES (?, ?, ?, ?) '
            'ON CONFLICT ("user", method) DO NOTHING',
            user,
            method,
            sealed,
            now,
        )
        return written == 1

    async def advance_counter(
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
        async with self.backend.tx() as db:
            current = (
                await db.execute(
                    'SELECT counter FROM factor_counters WHERE "user" = ? AND method = ? '
                    "AND key = ?",
                    (user, method, key),
                )
            ).one()
            if key and current is not None:
                if value == 0:
                    return int(current["counter"]) == 0
                cur = await db.execute(
                    "UPDATE factor_counters SET counter = ?, updated = ? "
                    'WHERE "user" = ? AND method = ? AND key = ? AND counter < ?',
                    (value, now, user, method, key, value),
                )
                return cur.rowcount == 1
            # Hold the credential row, still at the version read, until this commits:
            # a replacement either came first (no row) or waits for this transaction.
            held = await db.execute(
                "UPDATE credentials SET version = version "
                'WHERE "user" = ? AND method = ? AND version = ?',
                (user, method, version),
            )
            if held.rowcount != 1:
                return False
            cur = await db.execute(
                "INSERT INTO factor_counters VALUES (?, ?, ?, ?, ?) "
                'ON CONFLICT ("user", method, key) DO UPDATE SET counter = excluded.counter, '
                "updated = excluded.updated WHERE factor_counters.counter < excluded.counter",
                (user, method, key, value, now),
            )
        return cur.rowcount == 1

    async def load_credential(self, user: str, method: str) -> Credential | None:
        """The record, its version and its counters, read in one snapshot."""
        async with self.backend.tx(snapshot=True) as db:
            row = (
                await db.execute(
                    'SELECT sealed, version FROM credentials WHERE "user" = ? AND method = ?',
                    (user, method),
                )
            ).one()
            if row is None:
                return None
            rows = (
                await db.execute(
                    "SELECT key, counter, updated FROM factor_counters "
                    'WHERE "user" = ? AND method = ?',
                    (user, method),
                )
            ).rows
        data = self._unseal(user, method, bytes(row["sealed"]))
        counters = {r["key"]: int(r["counter"]) for r in rows}
        moved = {r["key"]: float(r["updated"]) for r in rows}
        return Credential(data, int(row["version"]), counters, moved)

    async def credential_version(self, user: str, method: str) -> int | None:
        """The credential's version now (None: there is none)."""
        row = await self._one(
            'SELECT version FROM credentials WHERE "user" = ? AND method = ?', user, method
        )
        return None if row is None else int(row["version"])

    async def get_credential(self, user: str, method: str) -> dict[str, Any] | None:
        row = await self._one(
            'SELECT sealed FROM credentials WHERE "user" = ? AND method = ?', user, method
        )
        if row is None:
            return None
        return self._unseal(user, method, bytes(row["sealed"]))

    async def credential_methods(self, user: str) -> list[str]:
        rows = await self._all('SELECT method FROM credentials WHERE "user" = ?', user)
        return [r["method"] for r in rows]

    async def delete_credential(self, user: str, method: str, version: int | None = None) -> bool:
        """Forget the user's ``method`` credential (only version ``version`` if given);
        False if there was none (or it moved on)."""
        sql = 'DELETE FROM credentials WHERE "user" = ? AND method = ?'
        args: tuple[Any, ...] = (user, method)
        if version is not None:
            sql, args = sql + " AND version = ?", (*args, version)
        return await self._write(sql, *args) > 0

    # -- one-time registration codes ----------------------------------------------------

    async def add_registration_code(
        self, user: str, method: str, code: str, *, expires: float, by: str, now: float
    ) -> None:
        """Keep a one-time code (its hash only) for ``user`` to register a ``method`` credential."""
        await self._require("users", user)
        await self._insert(
            "registration code",
            'INSERT INTO registration_codes (code_hash, "user", method, created, expires, '
            "created_by) VALUES (?, ?, ?, ?, ?, ?)",
            token_hash(code),
            user,
            method,
            now,
            expires,
            by,
        )

    async def registration_code_state(self, user: str, method: str, code: str, now: float) -> str:
        """``"valid"``, ``"used"``, ``"expired"`` or ``"unknown"`` (also: another user's code)."""
        row = await self._one(
            'SELECT "user", method, expires, used FROM registration_codes WHERE code_hash = ?',
            token_hash(code),
        )
        if row is None or row["user"] != user or row["method"] != method:
            return "unknown"
        if row["used"] is not None:
            return "used"
        return "expired" if row["expires"] < now else "valid"

    async def take_registration_code(self, user: str, method: str, code: str, now: float) -> bool:
        """Mark a valid code used (once: a second call, or a concurrent one, gets False)."""
        taken = await self._write(
            'UPDATE registration_codes SET used = ? WHERE code_hash = ? AND "user" = ? '
            "AND method = ? AND used IS NULL AND expires >= ?",
            now,
            token_hash(code),
            user,
            method,
            now,
        )
        return taken == 1

    # -- agents -------------------------------------------------------------------------

    async def add_agent(self, agent: str, org: str, token: str, expires: float, now: float) -> None:
        await self._require("orgs", org)
        await self._insert(
            f"agent {agent!r}",
            "INSERT INTO agents (id, org, created, token_hash, token_expires) "
            "VALUES (?, ?, ?, ?, ?)",
            agent,
            org,
            now,
            token_hash(token),
            expires,
        )

    async def agent_for_token(self, token: str, now: float) -> str | None:
        """The agent a valid (unused, unexpired, not disabled) enrollment token is for."""
        row = await self._one(
            "SELECT id FROM agents WHERE token_hash = ? AND token_expires >= ? AND disabled = 0",
            token_hash(token),
            now,
        )
        return None if row is None else str(row["id"])

    async def take_enrollment(
        self,
        token: str,
        fingerprint: str,
        noise_key: str,
        now: float,
        pq_key: str | None = None,
    ) -> str | None:
        """Consume a valid enrollment token; record the agent's keys. Returns the agent id.

        One conditional update: of two nodes (or connections) with the same token, one
        enrolls. ``pq_key`` is the agent's ML-KEM-768 public key; enrolling again
        replaces both keys.
        """
        async with self.backend.tx() as db:
            row = (
                await db.execute(
                    "UPDATE agents SET token_hash = NULL, token_expires = NULL, "
                    "cert_fingerprint = ?, noise_key = ?, pq_key = ?, enrolled = ? "
                    "WHERE token_hash = ? AND token_expires >= ? AND disabled = 0 RETURNING id",
                    (fingerprint, noise_key, pq_key, now, token_hash(token), now),
                )
            ).one()
        return None if row is None else str(row["id"])

    async def get_agent(self, agent: str) -> Agent | None:
        row = await self._one("SELECT * FROM agents WHERE id = ?", agent)
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

    async def touch_agent(self, agent: str, now: float) -> None:
        await self._write("UPDATE agents SET last_seen = ? WHERE id = ?", now, agent)

    # -- agreements ---------------------------------------------------------------------

    async def add_agreement(
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
        await self._require("vendors", vendor)
        await self._require("orgs", org)
        stamp = now if accepted else None
        await self._insert(
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

    async def agreements_between(self, vendor: str, org: str) -> list[Agreement]:
        rows = await self._all(
            "SELECT * FROM agreements WHERE vendor = ? AND org = ? ORDER BY id", vendor, org
        )
        return [_agreement(r) for r in rows]

    async def grants_of(self, user: str) -> set[str]:
        rows = await self._all('SELECT agent FROM grants WHERE "user" = ?', user)
        return {r["agent"] for r in rows}

    # -- lifecycle: disable, enable, remove; agreements; grants ----------------------------

    _DISABLEABLE = ("users", "vendors", "agents", "orgs")

    async def set_disabled(self, table: str, ident: str, disabled: bool) -> None:
        assert table in self._DISABLEABLE
        await self._require(table, ident)
        await self._write(
            f"UPDATE {table} SET disabled = ? WHERE id = ?",  # noqa: S608 - fixed names
            int(disabled),
            ident,
        )

    async def remove(self, table: str, ident: str) -> None:
        """Delete a row; StoreError if others still refer to it."""
        assert table in (*self._DISABLEABLE, "agreements")
        await self._require(table, ident)
        try:
            await self._write(f"DELETE FROM {table} WHERE id = ?", ident)  # noqa: S608
        except _Conflict as exc:
            raise StoreError(f"{table[:-1]} {ident!r} is still referred to; disable it") from exc

    async def get_agreement(self, agreement: str) -> Agreement | None:
        row = await self._one("SELECT * FROM agreements WHERE id = ?", agreement)
        return None if row is None else _agreement(row)

    async def accept_agreement(self, agreement: str, side: str, now: float) -> None:
        assert side in ("vendor", "org")
        await self._require("agreements", agreement)
        await self._write(
            f"UPDATE agreements SET {side}_accepted = ? WHERE id = ?",  # noqa: S608
            now,
            agreement,
        )

    async def set_agreement_state(self, agreement: str, state: str) -> None:
        assert state in ("active", "suspended")
        await self._require("agreements", agreement)
        await self._write("UPDATE agreements SET state = ? WHERE id = ?", state, agreement)

    async def set_source_networks(self, vendor: str, networks: list[str]) -> None:
        await self._require("vendors", vendor)
        await self._write(
            "UPDATE vendors SET source_networks = ? WHERE id = ?", json.dumps(networks), vendor
        )

    async def source_networks(self, vendor: str) -> list[str]:
        """CIDRs a vendor's users may log in from; empty: anywhere."""
        row = await self._one("SELECT source_networks FROM vendors WHERE id = ?", vendor)
        return _networks(row["source_networks"]) if row else []

    async def vendor_name(self, vendor: str) -> str:
        row = await self._one("SELECT name FROM vendors WHERE id = ?", vendor)
        return str(row["name"]) if row else vendor

    async def add_grant(self, user: str, agent: str, now: float) -> None:
        await self._require("users", user)
        await self._require("agents", agent)
        await self._insert(
            f"grant of {agent!r} to {user!r}",
            "INSERT INTO grants VALUES (?, ?, ?)",
            user,
            agent,
            now,
        )

    async def remove_grant(self, user: str, agent: str) -> bool:
        removed = await self._write(
            'DELETE FROM grants WHERE "user" = ? AND agent = ?', user, agent
        )
        return removed > 0

    # -- login credentials (gw login) ----------------------------------------------------
    # A credential is usable while it is not ended, not past ``expires`` and used within
    # ``idle_timeout``; each use moves ``last_used`` by one conditional update, so an
    # ending (logout, an administrator) and a use never undo each other.

    async def add_login(self, login: LoginCredential) -> None:
        await self._insert(
            f"login credential {login.id!r}",
            'INSERT INTO login_credentials (id, "user", mode, public_key, session, source, '
            "created, expires, idle_timeout, last_used) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            login.id,
            login.user,
            login.mode,
            login.public_key,
            login.session,
            login.source,
            login.created,
            login.expires,
            login.idle_timeout,
            login.last_used,
        )

    async def get_login(self, credential: str) -> LoginCredential | None:
        row = await self._one("SELECT * FROM login_credentials WHERE id = ?", credential)
        return _login(row) if row is not None else None

    async def use_login(self, credential: str, now: float) -> bool:
        """Record a use now; False (nothing changed) if it has ended, expired or idled out."""
        used = await self._write(
            "UPDATE login_credentials SET last_used = ? WHERE id = ? AND ended IS NULL "
            "AND expires > ? AND last_used + idle_timeout > ?",
            now,
            credential,
            now,
            now,
        )
        return used == 1

    async def keep_login(self, credential: str, active: float) -> None:
        """A live session of this credential was active at ``active``: the credential's
        idle time counts from then (never backwards, never for one that has ended)."""
        await self._write(
            "UPDATE login_credentials SET last_used = ? WHERE id = ? AND ended IS NULL "
            "AND last_used < ?",
            active,
            credential,
            active,
        )

    async def end_logins(
        self, user: str, now: float, reason: str, credential: str | None = None
    ) -> list[str]:
        """End the user's live credentials (only ``credential`` if given); the ids ended."""
        where = '"user" = ? AND ended IS NULL' + (" AND id = ?" if credential else "")
        args = (user, credential) if credential else (user,)
        # One statement: of two nodes ending the same credential, one names it.
        async with self.backend.tx() as db:
            rows = (
                await db.execute(
                    f"UPDATE login_credentials SET ended = ?, ended_reason = ? WHERE {where} "  # noqa: S608
                    "RETURNING id",
                    (now, reason, *args),
                )
            ).rows
        return sorted(str(r["id"]) for r in rows)

    async def logins_of(self, user: str, now: float) -> list[LoginCredential]:
        """The user's credentials that are still usable now."""
        rows = await self._all(
            'SELECT * FROM login_credentials WHERE "user" = ? AND ended IS NULL '
            "AND expires > ? AND last_used + idle_timeout > ? ORDER BY created",
            user,
            now,
            now,
        )
        return [_login(r) for r in rows]


@dataclass(frozen=True, slots=True)
class LoginCredential:
    """A ``gw login`` credential: the gateway holds its public key, never the private one."""

    id: str
    user: str
    mode: str
    public_key: str
    """The client's Ed25519 public key (base64url)."""
    session: str
    """The login's session id (``login.issued``): every use is audited with it."""
    source: str
    created: float
    expires: float
    idle_timeout: float
    last_used: float
    ended: float | None = None
    ended_reason: str | None = None


def _login(r: Mapping[str, Any]) -> LoginCredential:
    return LoginCredential(
        id=r["id"],
        user=r["user"],
        mode=r["mode"],
        public_key=r["public_key"],
        session=r["session"],
        source=r["source"],
        created=r["created"],
        expires=r["expires"],
        idle_timeout=r["idle_timeout"],
        last_used=r["last_used"],
        ended=r["ended"],
        ended_reason=r["ended_reason"],
    )


def _agreement(r: Mapping[str, Any]) -> Agreement:
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
