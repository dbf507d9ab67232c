"""A real PostgreSQL server for the tests, from the Debian package, in a temporary directory.

``initdb`` and ``postgres`` from ``/usr/lib/postgresql/<version>/bin`` (the newest
installed), run as an unprivileged user: as root (CI) they run as ``nobody`` through
``setpriv`` (``initdb`` refuses root), otherwise as the user running the tests. The
server listens only on a unix socket in its own directory (no port to collide with
another test run) and trusts local connections: a test server, never a real one.

Fixtures: :func:`postgres_server` (one per test session, skipped with the reason when
the binaries are absent; CI installs them, so CI never skips) and :func:`postgres_dsn`
(an empty namespace for each test: a schema of its own, first on the connection's
``search_path``. To the store that is a fresh database, and it is made in a
millisecond, where ``CREATE DATABASE`` took half a second on the 2-core CI machine).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

SUPERUSER = "gatewayd"
START_DEADLINE = 30.0
"""Seconds a server has to accept connections after it is started (a loaded CI machine)."""


def postgres_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` with initdb and postgres."""
    found = []
    for bindir in Path("/usr/lib/postgresql").glob("*/bin"):
        if (bindir / "initdb").exists() and (bindir / "postgres").exists():
            with contextlib.suppress(ValueError):
                found.append((float(bindir.parent.name), bindir))
    return max(found)[1] if found else None


def _as_user(argv: list[str]) -> list[str]:
    """``argv`` run as an unprivileged user: nobody when we are root."""
    if os.geteuid() != 0:
        return argv
    nobody = pwd.getpwnam("nobody")
    return [
        "setpriv",
        f"--reuid={nobody.pw_uid}",
        f"--regid={nobody.pw_gid}",
        "--clear-groups",
        "--",
        *argv,
    ]


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory; :meth:`stop` and :meth:`start`
    may be called again (an outage in a test)."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="gw-postgres-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "run"
        self.socket_dir.mkdir()
        self.log = self.root / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            for path in (self.root, self.socket_dir):
                os.chown(path, nobody.pw_uid, nobody.pw_gid)
        subprocess.run(
            _as_user(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    SUPERUSER,
                    "--auth=trust",
                    "--no-locale",
                    "--encoding=UTF8",
                    "--no-sync",
                ]
            ),
            check=True,
            capture_output=True,
            cwd=self.root,  # the user may not enter the directory the tests run in
        )

    def dsn(self, dbname: str = "postgres", schema: str | None = None) -> str:
        dsn = f"postgresql:///{dbname}?host={self.socket_dir}&user={SUPERUSER}"
        if schema is not None:
            dsn += f"&options=-csearch_path%3D{schema}"
        return dsn

    def start(self) -> None:
        assert self.proc is None
        log = self.log.open("ab")
        self.proc = subprocess.Popen(
            _as_user(
                [
                    str(self.bindir / "postgres"),
                    "-D",
                    str(self.data),
                    "-k",
                    str(self.socket_dir),
                    "-c",
                    "listen_addresses=",
                    # A test server: durability is not what is tested, speed is welcome.
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=200",
                ]
            ),
            stdout=log,
            stderr=log,
            cwd=self.root,
        )
        log.close()
        deadline = time.monotonic() + START_DEADLINE
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"postgres did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def ready(self) -> bool:
        result = subprocess.run(
            [str(self.bindir / "pg_isready"), "-q", "-h", str(self.socket_dir), "-U", SUPERUSER],
            check=False,
        )
        return result.returncode == 0

    def stop(self) -> None:
        """Fast shutdown: open connections are ended, as when the server goes away."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=START_DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def sql(self, statement: str) -> None:
        """Run one statement as the superuser."""
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(statement.encode())

    def fresh_dsn(self) -> str:
        """The DSN of an empty schema of its own (a fresh database to the store)."""
        name = "t_" + uuid.uuid4().hex[:16]
        self.sql(f"CREATE SCHEMA {name}")
        return self.dsn(schema=name)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (/usr/lib/postgresql/*/bin/postgres)")
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> str:
    """A DSN of a fresh database on the session's server."""
    if postgres_server.proc is None:  # a test that stopped it failed before starting it
        postgres_server.start()
    return postgres_server.fresh_dsn()
