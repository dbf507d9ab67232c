"""A real gatewayd, a real agent and a real echo service on loopback, per test module."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from world import PASSWORD, World, build_world  # noqa: F401 - re-exported

from gatewayd.audit import numbered_lines

SCHEMA = Path(__file__).resolve().parents[2] / "docs" / "audit.schema.json"


@pytest.fixture(scope="session", autouse=True)
def every_trail_matches_the_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the integration tests: every record each real gatewayd wrote (rotated and
    compressed files included) validates against docs/audit.schema.json."""
    yield
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    bad: list[str] = []
    for live in sorted(tmp_path_factory.getbasetemp().glob("**/gw/audit/audit.jsonl")):
        for path, number, line in numbered_lines(live):
            try:
                record = json.loads(line)
            except ValueError:
                bad.append(f"{path}:{number}: not JSON")
                continue
            if str(record.get("event", "")).startswith("test."):
                continue  # filler a test wrote itself (the full-disk test)
            bad.extend(
                f"{path}:{number} ({record.get('event')}): {e.message}"
                for e in validator.iter_errors(record)
            )
    assert not bad, "\n".join(bad[:30])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = build_world(
        tmp_path_factory.mktemp("lab"),
        gateway_keys="handshake_timeout = 2",
        extra_config="[lockout]\nthreshold = 3\nbase_seconds = 60\n",
    )
    try:
        yield w
    finally:
        w.lab.close()
        w.echo.close()


# -- smartcard (issue 4: PKI smartcard for home office) ---------------------------------
# pcscd with the vpcd virtual readers (started once per test session, shared with
# tests/auth), the national-profile test PKI, and a world whose gateway the tests in
# tests/integration/test_smartcard.py point at that PKI.

import pki  # noqa: E402 - tests/support, put on sys.path by tests/conftest.py
from pcsc import pcscd_vpcd  # noqa: E402, F401 - session fixture: pcscd + vpcd readers


@pytest.fixture(scope="module")
def card_pki(tmp_path_factory: pytest.TempPathFactory) -> pki.CardPKI:
    """A test PKI (root, person CA, a rogue look-alike) with its files in a fresh folder."""
    return pki.CardPKI(tmp_path_factory.mktemp("card-pki"))


@pytest.fixture(scope="module")
def card_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The usual world (as ``gatewayd init`` made it: homeoffice = smartcard + password),
    with lockout and rate limits high enough for a module of failing logins."""
    w = build_world(
        tmp_path_factory.mktemp("office"),
        extra_config="[lockout]\nthreshold = 100\n\n[limits]\nauth_per_minute = 1000\n",
    )
    try:
        yield w
    finally:
        w.lab.close()
        w.echo.close()
