"""The SQLite directory (gatewayd/store.py): records, sealed credentials, enrollment tokens."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from gatewayd.store import (
    Agent,
    Agreement,
    Store,
    StoreError,
    User,
    load_secrets_key,
    token_hash,
)

NOW = 1_700_000_000.0
KEY = bytes(range(32))
TOTP_SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "directory.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    s = Store(db_path, KEY)
    yield s
    s.close()


@pytest.fixture
def directory(store: Store) -> Store:
    """One org with an agent, one vendor with a user, one employee."""
    store.add_org("clinic", "Clinic", NOW)
    store.add_vendor("acme", "ACME Medical", NOW)
    store.add_user("vera@acme", kind="vendor", vendor="acme", org=None, now=NOW)
    store.add_user("emil@clinic", kind="employee", vendor=None, org="clinic", now=NOW)
    store.add_agent("pc-1", "clinic", "enroll-token-1", expires=NOW + 3600, now=NOW)
    return store


# -- round trips -----------------------------------------------------------------------------------


def test_orgs_and_vendors(directory: Store) -> None:
    assert directory.org_exists("clinic")
    assert not directory.org_exists("hospital")
    assert directory.vendor_disabled("acme") is False
    assert directory.vendor_disabled("nobody") is None
    orgs = directory.list_rows("orgs")
    assert [(r["id"], r["name"], r["created"], r["disabled"]) for r in orgs] == [
        ("clinic", "Clinic", NOW, 0)
    ]
    assert [r["id"] for r in directory.list_rows("vendors")] == ["acme"]


def test_users(directory: Store) -> None:
    assert directory.get_user("vera@acme") == User(
        "vera@acme", "vendor", "acme", None, disabled=False, failures=0, locked_until=0
    )
    assert directory.get_user("emil@clinic") == User(
        "emil@clinic", "employee", None, "clinic", disabled=False, failures=0, locked_until=0
    )
    assert directory.get_user("nobody") is None
    assert [r["id"] for r in directory.list_rows("users")] == ["emil@clinic", "vera@acme"]


def test_user_references_must_exist(store: Store) -> None:
    with pytest.raises(StoreError, match="no vendor 'ghost'"):
        store.add_user("u", kind="vendor", vendor="ghost", org=None, now=NOW)
    with pytest.raises(StoreError, match="no org 'ghost'"):
        store.add_user("u", kind="employee", vendor=None, org="ghost", now=NOW)
    assert store.get_user("u") is None


def test_user_kind_is_checked(store: Store) -> None:
    store.add_org("clinic", "Clinic", NOW)
    with pytest.raises(StoreError):
        store.add_user("u", kind="admin", vendor=None, org="clinic", now=NOW)


def test_failures_and_lock(directory: Store) -> None:
    assert directory.record_failure("vera@acme", None) == 1
    assert directory.record_failure("vera@acme", NOW + 60) == 2
    user = directory.get_user("vera@acme")
    assert user is not None and (user.failures, user.locked_until) == (2, NOW + 60)
    directory.record_success("vera@acme")
    user = directory.get_user("vera@acme")
    assert user is not None and (user.failures, user.locked_until) == (0, 0)


def test_agents(directory: Store) -> None:
    assert directory.get_agent("pc-1") == Agent(
        "pc-1",
        "clinic",
        disabled=False,
        enrolled=False,
        cert_fingerprint=None,
        noise_key=None,
        token_expires=NOW + 3600,
        last_seen=None,
    )
    assert directory.get_agent("pc-2") is None
    directory.touch_agent("pc-1", NOW + 5)
    agent = directory.get_agent("pc-1")
    assert agent is not None and agent.last_seen == NOW + 5
    with pytest.raises(StoreError, match="no org 'ghost'"):
        directory.add_agent("pc-9", "ghost", "t", expires=NOW + 1, now=NOW)


def test_agent_rows_do_not_list_the_token_hash(directory: Store) -> None:
    (row,) = directory.list_rows("agents")
    assert "token_hash" not in row
    assert token_hash("enroll-token-1") not in row.values()


def test_agreements(directory: Store) -> None:
    directory.add_agreement(
        "acme-clinic",
        vendor="acme",
        org="clinic",
        modes=("access", "support"),
        unattended=True,
        valid_from=NOW,
        valid_until=NOW + 86400,
        accepted=True,
        now=NOW,
    )
    directory.add_agreement(
        "acme-clinic-2",
        vendor="acme",
        org="clinic",
        modes=("support",),
        unattended=False,
        valid_from=None,
        valid_until=None,
        accepted=False,
        now=NOW,
    )
    assert directory.agreements_between("acme", "clinic") == [
        Agreement(
            "acme-clinic",
            "acme",
            "clinic",
            ("access", "support"),
            unattended=True,
            valid_from=NOW,
            valid_until=NOW + 86400,
            state="active",
            vendor_accepted=NOW,
            org_accepted=NOW,
        ),
        Agreement(
            "acme-clinic-2",
            "acme",
            "clinic",
            ("support",),
            unattended=False,
            valid_from=None,
            valid_until=None,
            state="active",
            vendor_accepted=None,
            org_accepted=None,
        ),
    ]
    assert directory.agreements_between("acme", "hospital") == []
    with pytest.raises(StoreError, match="no vendor"):
        directory.add_agreement(
            "x",
            vendor="ghost",
            org="clinic",
            modes=("access",),
            unattended=False,
            valid_from=None,
            valid_until=None,
            accepted=True,
            now=NOW,
        )


def test_agreement_acceptance_and_state(directory: Store) -> None:
    directory.add_agreement(
        "a",
        vendor="acme",
        org="clinic",
        modes=("access",),
        unattended=False,
        valid_from=None,
        valid_until=None,
        accepted=False,
        now=NOW,
    )
    directory.accept_agreement("a", "vendor", NOW + 1)
    directory.accept_agreement("a", "org", NOW + 2)
    directory.set_agreement_state("a", "suspended")
    agreement = directory.get_agreement("a")
    assert agreement is not None
    assert (agreement.vendor_accepted, agreement.org_accepted) == (NOW + 1, NOW + 2)
    assert agreement.state == "suspended"
    assert directory.get_agreement("b") is None
    with pytest.raises(StoreError):
        directory.accept_agreement("b", "org", NOW)


def test_grants(directory: Store) -> None:
    assert directory.grants_of("emil@clinic") == set()
    directory.add_grant("emil@clinic", "pc-1", NOW)
    assert directory.grants_of("emil@clinic") == {"pc-1"}
    with pytest.raises(StoreError, match="already exists"):
        directory.add_grant("emil@clinic", "pc-1", NOW)
    with pytest.raises(StoreError, match="no agent"):
        directory.add_grant("emil@clinic", "pc-9", NOW)
    assert directory.remove_grant("emil@clinic", "pc-1")
    assert not directory.remove_grant("emil@clinic", "pc-1")
    assert directory.grants_of("emil@clinic") == set()


def test_disable_and_remove(directory: Store) -> None:
    directory.set_disabled("vendors", "acme", True)
    assert directory.vendor_disabled("acme") is True
    directory.set_disabled("users", "vera@acme", True)
    user = directory.get_user("vera@acme")
    assert user is not None and user.disabled
    with pytest.raises(StoreError, match="still referred to"):
        directory.remove("vendors", "acme")  # vera still belongs to it
    directory.remove("users", "vera@acme")
    directory.remove("vendors", "acme")
    assert directory.get_user("vera@acme") is None
    assert directory.vendor_disabled("acme") is None
    with pytest.raises(StoreError, match="no user"):
        directory.remove("users", "vera@acme")


def test_removing_a_user_removes_credentials_and_grants(directory: Store) -> None:
    directory.set_credential("emil@clinic", "password", {"hash": "h"}, NOW)
    directory.add_grant("emil@clinic", "pc-1", NOW)
    directory.remove("users", "emil@clinic")
    assert directory.db.execute("SELECT COUNT(*) FROM credentials").fetchone()[0] == 0
    assert directory.db.execute("SELECT COUNT(*) FROM grants").fetchone()[0] == 0


@pytest.mark.parametrize(
    "add",
    [
        lambda s: s.add_org("clinic", "Other name", NOW),
        lambda s: s.add_vendor("acme", "Other name", NOW),
        lambda s: s.add_user("vera@acme", kind="vendor", vendor="acme", org=None, now=NOW),
        lambda s: s.add_user("vera@acme", kind="employee", vendor=None, org="clinic", now=NOW),
        lambda s: s.add_agent("pc-1", "clinic", "another-token", expires=NOW + 1, now=NOW),
    ],
    ids=["org", "vendor", "user", "user-other-kind", "agent"],
)
def test_duplicate_ids(directory: Store, add: object) -> None:
    with pytest.raises(StoreError, match="already exists"):
        add(directory)  # type: ignore[operator]


def test_duplicate_agreement(directory: Store) -> None:
    kw = {
        "vendor": "acme",
        "org": "clinic",
        "modes": ("access",),
        "unattended": False,
        "valid_from": None,
        "valid_until": None,
        "accepted": True,
        "now": NOW,
    }
    directory.add_agreement("a", **kw)  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="agreement 'a' already exists"):
        directory.add_agreement("a", **kw)  # type: ignore[arg-type]


def test_data_survives_reopening(db_path: Path) -> None:
    first = Store(db_path, KEY)
    first.add_org("clinic", "Clinic", NOW)
    first.add_user("emil@clinic", kind="employee", vendor=None, org="clinic", now=NOW)
    first.set_credential("emil@clinic", "totp", {"secret": TOTP_SECRET}, NOW)
    first.close()
    second = Store(db_path, KEY)
    try:
        assert second.org_exists("clinic")
        assert second.get_credential("emil@clinic", "totp") == {"secret": TOTP_SECRET}
    finally:
        second.close()


def test_newer_schema_is_refused(db_path: Path) -> None:
    Store(db_path, KEY).close()
    with sqlite3.connect(db_path) as db:
        db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(StoreError, match="newer than this gatewayd"):
        Store(db_path, KEY)


# -- sealed credentials ----------------------------------------------------------------------------


def test_credential_round_trip(directory: Store) -> None:
    assert directory.get_credential("vera@acme", "totp") is None
    directory.set_credential("vera@acme", "totp", {"secret": TOTP_SECRET, "last_counter": 1}, NOW)
    assert directory.get_credential("vera@acme", "totp") == {
        "secret": TOTP_SECRET,
        "last_counter": 1,
    }
    directory.set_credential("vera@acme", "totp", {"secret": TOTP_SECRET, "last_counter": 2}, NOW)
    assert directory.get_credential("vera@acme", "totp") == {
        "secret": TOTP_SECRET,
        "last_counter": 2,
    }
    assert directory.credential_methods("vera@acme") == ["totp"]
    assert directory.delete_credential("vera@acme", "totp")
    assert not directory.delete_credential("vera@acme", "totp")
    assert directory.get_credential("vera@acme", "totp") is None


def test_credential_for_unknown_user(store: Store) -> None:
    with pytest.raises(StoreError, match="no user"):
        store.set_credential("ghost", "totp", {"secret": TOTP_SECRET}, NOW)


def test_database_files_do_not_hold_the_secret(directory: Store, db_path: Path) -> None:
    directory.set_credential("vera@acme", "totp", {"secret": TOTP_SECRET}, NOW)
    directory.set_credential("vera@acme", "password", {"hash": "scrypt$15$8$1$salt$key"}, NOW)
    files = list(db_path.parent.iterdir())  # the database, its -wal and -shm
    assert db_path in files
    raw = b"".join(f.read_bytes() for f in files)
    assert b"vera@acme" in raw  # the search works: the user id is there in the clear
    assert TOTP_SECRET.encode() not in raw
    assert b"scrypt$15" not in raw
    sealed = directory.db.execute(
        "SELECT sealed FROM credentials WHERE user = ? AND method = 'totp'", ("vera@acme",)
    ).fetchone()[0]
    assert len(sealed) >= 12 + 16  # nonce and tag around the ciphertext


def test_sealed_blob_moved_to_another_user_does_not_unseal(directory: Store) -> None:
    directory.set_credential("vera@acme", "totp", {"secret": TOTP_SECRET}, NOW)
    directory.set_credential("emil@clinic", "totp", {"secret": "OTHER"}, NOW)
    with directory.tx() as db:
        db.execute(
            "UPDATE credentials SET sealed = (SELECT sealed FROM credentials "
            "WHERE user = 'vera@acme' AND method = 'totp') "
            "WHERE user = 'emil@clinic' AND method = 'totp'"
        )
    with pytest.raises(StoreError, match="does not unseal"):
        directory.get_credential("emil@clinic", "totp")
    assert directory.get_credential("vera@acme", "totp") == {"secret": TOTP_SECRET}


def test_sealed_blob_moved_to_another_method_does_not_unseal(directory: Store) -> None:
    directory.set_credential("vera@acme", "totp", {"secret": TOTP_SECRET}, NOW)
    with directory.tx() as db:
        db.execute(
            "INSERT INTO credentials SELECT user, 'fido2', sealed, updated FROM credentials "
            "WHERE user = 'vera@acme' AND method = 'totp'"
        )
    with pytest.raises(StoreError, match="does not unseal"):
        directory.get_credential("vera@acme", "fido2")


def test_tampered_blob_does_not_unseal(directory: Store) -> None:
    directory.set_credential("vera@acme", "totp", {"secret": TOTP_SECRET}, NOW)
    with directory.tx() as db:
        (sealed,) = db.execute("SELECT sealed FROM credentials").fetchone()
        flipped = bytes(sealed[:-1]) + bytes([sealed[-1] ^ 1])
        db.execute("UPDATE credentials SET sealed = ?", (flipped,))
    with pytest.raises(StoreError, match="does not unseal"):
        directory.get_credential("vera@acme", "totp")


def test_another_key_does_not_unseal(db_path: Path) -> None:
    first = Store(db_path, KEY)
    first.add_org("clinic", "Clinic", NOW)
    first.add_user("emil@clinic", kind="employee", vendor=None, org="clinic", now=NOW)
    first.set_credential("emil@clinic", "totp", {"secret": TOTP_SECRET}, NOW)
    first.close()
    other = Store(db_path, bytes(32))
    try:
        with pytest.raises(StoreError, match="does not unseal"):
            other.get_credential("emil@clinic", "totp")
    finally:
        other.close()


def test_load_secrets_key(tmp_path: Path) -> None:
    good = tmp_path / "secrets.key"
    good.write_bytes(KEY)
    assert load_secrets_key(good) == KEY
    short = tmp_path / "short.key"
    short.write_bytes(KEY[:31])
    with pytest.raises(StoreError, match="exactly 32 bytes"):
        load_secrets_key(short)
    with pytest.raises(StoreError, match="cannot read secrets key"):
        load_secrets_key(tmp_path / "missing.key")


# -- enrollment tokens -----------------------------------------------------------------------------


def test_enrollment_token_is_single_use(directory: Store) -> None:
    assert directory.take_enrollment("enroll-token-1", "ab" * 32, "noise-key", NOW + 10) == "pc-1"
    agent = directory.get_agent("pc-1")
    assert agent is not None
    assert agent.enrolled
    assert (agent.cert_fingerprint, agent.noise_key, agent.token_expires) == (
        "ab" * 32,
        "noise-key",
        None,
    )
    assert directory.take_enrollment("enroll-token-1", "cd" * 32, "other", NOW + 11) is None
    agent = directory.get_agent("pc-1")
    assert agent is not None and agent.cert_fingerprint == "ab" * 32  # unchanged


def test_enrollment_token_is_kept_hashed(directory: Store, db_path: Path) -> None:
    (stored,) = directory.db.execute("SELECT token_hash FROM agents").fetchone()
    assert stored == token_hash("enroll-token-1") != "enroll-token-1"
    raw = b"".join(f.read_bytes() for f in db_path.parent.iterdir())
    assert b"enroll-token-1" not in raw


def test_enrollment_token_expires(directory: Store) -> None:
    assert directory.take_enrollment("enroll-token-1", "ab", "k", NOW + 3600.001) is None
    agent = directory.get_agent("pc-1")
    assert agent is not None and not agent.enrolled


def test_enrollment_token_valid_until_its_expiry(directory: Store) -> None:
    assert directory.take_enrollment("enroll-token-1", "ab", "k", NOW + 3600) == "pc-1"


def test_wrong_enrollment_token(directory: Store) -> None:
    assert directory.take_enrollment("enroll-token-2", "ab", "k", NOW) is None
    assert directory.take_enrollment("", "ab", "k", NOW) is None


def test_disabled_agent_cannot_enroll(directory: Store) -> None:
    directory.set_disabled("agents", "pc-1", True)
    assert directory.take_enrollment("enroll-token-1", "ab", "k", NOW) is None
    directory.set_disabled("agents", "pc-1", False)
    assert directory.take_enrollment("enroll-token-1", "ab", "k", NOW) == "pc-1"


def test_each_agent_takes_its_own_token(directory: Store) -> None:
    directory.add_agent("pc-2", "clinic", "enroll-token-2", expires=NOW + 3600, now=NOW)
    assert directory.take_enrollment("enroll-token-2", "ab", "k2", NOW) == "pc-2"
    assert directory.take_enrollment("enroll-token-1", "cd", "k1", NOW) == "pc-1"
    agent = directory.get_agent("pc-1")
    assert agent is not None and agent.noise_key == "k1"


# -- one-time registration codes -------------------------------------------------------------------


def test_registration_code(directory: Store) -> None:
    directory.add_registration_code(
        "vera@acme", "fido2", "K7Q2-9XZA", expires=NOW + 600, by="root", now=NOW
    )
    assert directory.registration_code_state("vera@acme", "fido2", "K7Q2-9XZA", NOW) == "valid"
    assert directory.registration_code_state("emil@clinic", "fido2", "K7Q2-9XZA", NOW) == "unknown"
    assert directory.registration_code_state("vera@acme", "totp", "K7Q2-9XZA", NOW) == "unknown"
    assert not directory.take_registration_code("emil@clinic", "fido2", "K7Q2-9XZA", NOW)
    assert directory.take_registration_code("vera@acme", "fido2", "K7Q2-9XZA", NOW + 1)
    assert not directory.take_registration_code("vera@acme", "fido2", "K7Q2-9XZA", NOW + 2)
    assert directory.registration_code_state("vera@acme", "fido2", "K7Q2-9XZA", NOW) == "used"


def test_registration_code_expires(directory: Store) -> None:
    directory.add_registration_code(
        "vera@acme", "fido2", "C0DE", expires=NOW + 600, by="root", now=NOW
    )
    assert directory.registration_code_state("vera@acme", "fido2", "C0DE", NOW + 601) == "expired"
    assert not directory.take_registration_code("vera@acme", "fido2", "C0DE", NOW + 601)
