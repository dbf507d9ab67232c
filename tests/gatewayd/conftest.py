"""Fixtures of the daemon's tests: a real PostgreSQL server (tests/support/postgres.py)."""

from postgres import postgres_dsn, postgres_server  # noqa: F401 - fixtures
