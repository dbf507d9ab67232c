"""The directory (gatewayd/store.py): records, sealed credentials, enrollment tokens.

Every test of the ``store`` and ``directory`` fixtures runs twice: on SQLite and on a
real PostgreSQL server (tests/support/postgres.py). The attacks on shared state use two
stores on one PostgreSQL database: two nodes of a cluster.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from postgres import PostgresServer

from gatewayd.config import ConfigError, parse
from gatewayd.store import (
    Agent,
    Agreement,
    Attempt,
    AttemptEnd,
    Credential,
    Lockout,
    LoginCredential,
    Sqlite,
    Store,
    StoreError,
    StoreUnavailable,
    User,
    load_secrets_key,
    safe_dsn,
    token_hash,
)

NOW = 1_700_000_000.0
KEY = bytes(range(32))
TOTP_SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"


async def scalar(store: Store, sql: str, *args: Any) -> Any:
    """The first column of the first row of a query (one text for both backends)."""
    async with store.tx() as db:
        row = (await db.execute(sql, args)).one()
    assert row is not None
    return next(iter(row.values()))


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "directory.db"


pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, db_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        s = Store(db_path, KEY)
    else:
        s = await Store.open(request.getfixturevalue("postgres_dsn"), KEY)
    yield s
    await s.close()


async def fill(store: Store) -> Store:
    """One org with an agent, one vendor with a user, one employee."""
    await store.add_org("clinic", "Clinic", NOW)
    await store.add_vendor("acme", "ACME Medical", NOW)
    await store.add_user("vera@acme", kind="vendor", vendor="acme", org=None, now=NOW)
    await store.add_user("emil@clinic", kind="employee", vendor=None, org="clinic", now=NOW)
    await store.add_agent("pc-1", "clinic", "enroll-token-1", expires=NOW + 3600, now=NOW)
    return store


@pytest_asyncio.fixture
async def directory(store: Store) -> Store:
    return await fill(store)


@pytest_asyncio.fixture
async def sqlite_directory(db_path: Path) -> AsyncIterator[Store]:
    """The directory on SQLite alone: for tests that read its files."""
    s = Store(db_path, KEY)
    yield await fill(s)
    await s.close()


# -- round trips -----------------------------------------------------------------------------------


async def test_orgs_and_vendors(directory: Store) -> None:
    assert await directory.org_exists("clinic")
    assert not await directory.org_exists("hospital")
    assert await directory.vendor_disabled("acme") is False
    assert await directory.vendor_disabled("nobody") is None
    orgs = await directory.list_rows("orgs")
    assert [(r["id"], r["name"], r["created"], r["disabled"]) for r in orgs] == [
        ("clinic", "Clinic", NOW, 0)
    ]
    assert [r["id"] for r in await directory.list_rows("vendors")] == ["acme"]


async def test_users(directory: Store) -> None:
    assert await directory.get_user("vera@acme") == User(
        "vera@acme", "vendor", "acme", None, disabled=False, failures=0, locked_until=0
    )
    assert await directory.get_user("emil@clinic") == User(
        "emil@clinic", "employee", None, "clinic", disabled=False, failures=0, locked_until=0
    )
    assert await directory.get_user("nobody") is None
    assert [r["id"] for r in await directory.list_rows("users")] == ["emil@clinic", "vera@acme"]


async def test_user_references_must_exist(store: Store) -> None:
    with pytest.raises(StoreError, match="no vendor 'ghost'"):
        await store.add_user("u", kind="vendor", vendor="ghost", org=None, now=NOW)
    with pytest.raises(StoreError, match="no org 'ghost'"):
        await store.add_user("u", kind="employee", vendor=None, org="ghost", now=NOW)
    assert await store.get_user("u") is None


async def test_user_kind_is_checked(store: Store) -> None:
    await store.add_org("clinic", "Clinic", NOW)
    with pytest.raises(StoreError):
        await store.add_user("u", kind="admin", vendor=None, org="clinic", now=NOW)


# -- the lockout: slots, counting and the lock in one transaction -------------------------

POLICY = Lockout(threshold=5, base_seconds=60, max_seconds=3600, decay_seconds=3600)


async def fail(
    store: Store, user: str = "vera@acme", now: float = NOW, policy: Lockout = POLICY
) -> AttemptEnd:
    assert await store.begin_attempt(user, now, policy) is Attempt.GO
    return await store.end_attempt(user, ok=False, final=False, now=now, policy=policy)


async def test_parallel_attempts_get_no_more_guesses_than_the_threshold(directory: Store) -> None:
    """20 checks at once: only 5 (the threshold) get a slot; those 5 failing lock the account."""
    answers = [await directory.begin_attempt("vera@acme", NOW, POLICY) for _ in range(20)]
    assert answers.count(Attempt.GO) == 5
    assert set(answers[5:]) == {Attempt.BUSY}
    ends = [
        await directory.end_attempt("vera@acme", ok=False, final=False, now=NOW, policy=POLICY)
        for _ in range(5)
    ]
    assert [e.failures for e in ends] == [1, 2, 3, 4, 5]
    assert [e.newly_locked for e in ends] == [None, None, None, None, 60]
    assert ends[-1].locked(NOW) and ends[-1].locked_until == NOW + 60
    # The right answer arriving now is refused before it is checked.
    assert await directory.begin_attempt("vera@acme", NOW + 1, POLICY) is Attempt.LOCKED
    user = await directory.get_user("vera@acme")
    assert user is not None and (user.failures, user.locked_until) == (5, NOW + 60)


async def test_a_right_answer_in_flight_fails_when_others_lock_meanwhile(directory: Store) -> None:
    slots = [await directory.begin_attempt("vera@acme", NOW, POLICY) for _ in range(5)]
    assert slots == [Attempt.GO] * 5
    for _ in range(4):
        await directory.end_attempt("vera@acme", ok=False, final=False, now=NOW, policy=POLICY)
    # Four wrong guesses and one right one in flight: the right one ends last, but the
    # lock is decided only by failures, and four do not reach it.
    right = await directory.end_attempt("vera@acme", ok=True, final=True, now=NOW, policy=POLICY)
    assert not right.locked(NOW) and right.failures == 0
    # Now five wrong in flight plus one right: the right one sees the lock.
    slots = [await directory.begin_attempt("vera@acme", NOW, POLICY) for _ in range(6)]
    assert slots == [Attempt.GO] * 5 + [Attempt.BUSY]
    for _ in range(4):
        await directory.end_attempt("vera@acme", ok=False, final=False, now=NOW, policy=POLICY)
    last = await directory.end_attempt("vera@acme", ok=False, final=False, now=NOW, policy=POLICY)
    assert last.locked(NOW)


async def test_lock_grows_is_capped_and_the_slot_after_it_is_one_at_a_time(
    directory: Store,
) -> None:
    now = NOW
    for _ in range(5):
        end = await fail(directory, now=now)
    assert end.newly_locked == 60
    now = end.locked_until
    assert await directory.begin_attempt("vera@acme", now, POLICY) is Attempt.GO
    assert await directory.begin_attempt("vera@acme", now, POLICY) is Attempt.BUSY  # one at a time
    end = await directory.end_attempt("vera@acme", ok=False, final=False, now=now, policy=POLICY)
    assert (end.failures, end.newly_locked) == (6, 120)
    lengths = []
    for _ in range(8):
        now = end.locked_until
        end = await fail(directory, now=now)
        lengths.append(end.newly_locked)
    assert lengths == [240, 480, 960, 1920, 3600, 3600, 3600, 3600]


async def test_failures_decay(directory: Store) -> None:
    """One failure forgiven per full decay period without failures."""
    for _ in range(4):
        await fail(directory)
    # Three hours later, three of the four are forgiven: this failure is the second.
    end = await fail(directory, now=NOW + 3 * 3600 + 1)
    assert (end.failures, end.newly_locked) == (2, None)
    # A guess a day never locks and never accumulates.
    now = NOW + 3 * 3600 + 1
    for _ in range(200):
        now += 86400
        end = await fail(directory, now=now)
        assert end.failures == 1 and not end.locked(now)


async def test_hard_limit_needs_an_administrator(directory: Store) -> None:
    """NIST SP 800-63B 5.2.2: at most 100 consecutive failures, then only an admin opens it."""
    policy = Lockout()  # the defaults: the lock is capped at an hour, decay is a day
    now = NOW
    end = None
    for _ in range(100):
        end = await fail(directory, now=now, policy=policy)
        now = max(now, end.locked_until)  # one guess per lock period
    assert end is not None and end.admin_locked and end.newly_locked == float("inf")
    assert end.failures == 100
    far = now + 10 * 365 * 86400.0
    assert await directory.begin_attempt("vera@acme", far, policy) is Attempt.ADMIN_LOCKED
    before = await directory.unlock("vera@acme")
    assert before.admin_locked and before.failures == 100
    assert await directory.begin_attempt("vera@acme", far, policy) is Attempt.GO
    user = await directory.get_user("vera@acme")
    assert user is not None and (user.failures, user.admin_locked) == (0, False)
    with pytest.raises(StoreError, match="no user"):
        await directory.unlock("ghost")


async def test_success_clears_failures_only_at_the_final_factor(directory: Store) -> None:
    for _ in range(3):
        await fail(directory)
    assert await directory.begin_attempt("vera@acme", NOW, POLICY) is Attempt.GO
    end = await directory.end_attempt("vera@acme", ok=True, final=False, now=NOW, policy=POLICY)
    assert end.failures == 3  # the password alone does not clear them
    assert await directory.begin_attempt("vera@acme", NOW, POLICY) is Attempt.GO
    end = await directory.end_attempt("vera@acme", ok=True, final=True, now=NOW, policy=POLICY)
    assert end.failures == 0


async def test_unknown_user_and_cancelled_slots(directory: Store) -> None:
    assert await directory.begin_attempt("ghost", NOW, POLICY) is Attempt.UNKNOWN
    for _ in range(5):
        assert await directory.begin_attempt("vera@acme", NOW, POLICY) is Attempt.GO
    assert await directory.begin_attempt("vera@acme", NOW, POLICY) is Attempt.BUSY
    await directory.cancel_attempt("vera@acme")
    assert await directory.begin_attempt("vera@acme", NOW, POLICY) is Attempt.GO


async def test_slots_left_by_a_stopped_daemon_are_freed(db_path: Path) -> None:
    first = Store(db_path, KEY)
    await first.add_vendor("acme", "ACME", NOW)
    await first.add_user("vera@acme", kind="vendor", vendor="acme", org=None, now=NOW)
    for _ in range(5):
        await first.begin_attempt("vera@acme", NOW, POLICY)
    await first.close()
    second = Store(db_path, KEY)
    try:
        assert await second.begin_attempt("vera@acme", NOW, POLICY) is Attempt.GO
    finally:
        await second.close()


async def test_slots_of_a_crashed_node_are_freed_after_their_lease(
    request: pytest.FixtureRequest, directory: Store
) -> None:
    """A node that dies mid-check never gives its slots back (on PostgreSQL no start-up
    frees them, another node goes on): the next attempt after the lease frees them."""
    crashed = directory
    if "postgresql" in request.node.callspec.id:
        # The crashed node's store is dropped without end_attempt; another node goes on.
        survivor = await Store.open(request.getfixturevalue("postgres_dsn"), KEY)
    else:
        survivor = crashed
    try:
        for _ in range(5):
            assert await crashed.begin_attempt("vera@acme", NOW, POLICY) is Attempt.GO
        if survivor is not crashed:
            await crashed.close()
        lease = POLICY.slot_lease
        # Within the lease the slots may still be checks in flight: none is given.
        assert await survivor.begin_attempt("vera@acme", NOW + lease - 1, POLICY) is Attempt.BUSY
        # Past it they are abandoned: the same update frees them and takes one.
        later = NOW + lease + 1
        assert await survivor.begin_attempt("vera@acme", later, POLICY) is Attempt.GO
        assert await scalar(survivor, "SELECT pending FROM users WHERE id = ?", "vera@acme") == 1
        # The lease runs from the last slot taken: the fresh one is counted again.
        for _ in range(4):
            assert await survivor.begin_attempt("vera@acme", later, POLICY) is Attempt.GO
        assert await survivor.begin_attempt("vera@acme", later, POLICY) is Attempt.BUSY
    finally:
        if survivor is not crashed:
            await survivor.close()


# -- factor state: versions and forward-only counters -----------------------------------------


async def test_totp_step_is_accepted_once(directory: Store) -> None:
    version = await directory.set_credential("vera@acme", "totp", {"secret": TOTP_SECRET}, NOW)
    assert await directory.advance_counter("vera@acme", "totp", "", 100, version=version, now=NOW)
    # The same step again (a replay, or a parallel login with the same code): refused.
    assert not await directory.advance_counter(
        "vera@acme", "totp", "", 100, version=version, now=NOW
    )
    assert not await directory.advance_counter(
        "vera@acme", "totp", "", 99, version=version, now=NOW
    )
    assert await directory.advance_counter("vera@acme", "totp", "", 101, version=version, now=NOW)
    await directory.advance_counter("vera@acme", "totp", "", 102, version=version, now=NOW + 30)
    loaded = await directory.load_credential("vera@acme", "totp")
    assert loaded == Credential({"secret": TOTP_SECRET}, version, {"": 102}, {"": NOW + 30})


async def test_new_totp_seed_defeats_a_login_that_read_the_old_one(directory: Store) -> None:
    old = await directory.set_credential("vera@acme", "totp", {"secret": TOTP_SECRET}, NOW)
    await directory.advance_counter("vera@acme", "totp", "", 100, version=old, now=NOW)
    new = await directory.set_credential(
        "vera@acme", "totp", {"secret": "OTHERSECRET"}, NOW, reset_counters=True
    )
    assert new == old + 1
    # A login parked with the old seed: its step is refused, the new seed is kept.
    assert not await directory.advance_counter("vera@acme", "totp", "", 200, version=old, now=NOW)
    assert await directory.load_credential("vera@acme", "totp") == Credential(
        {"secret": "OTHERSECRET"}, new, {}
    )


async def test_fido2_counters_per_key(directory: Store) -> None:
    record = {"credentials": [{"id": "k1", "sign_count": 1}, {"id": "k2", "sign_count": 0}]}
    version = await directory.set_credential("vera@acme", "fido2", record, NOW)
    assert await directory.advance_counter("vera@acme", "fido2", "k1", 5, version=version, now=NOW)
    assert await directory.advance_counter("vera@acme", "fido2", "k2", 3, version=version, now=NOW)
    assert not await directory.advance_counter(
        "vera@acme", "fido2", "k1", 5, version=version, now=NOW
    )
    assert not await directory.advance_counter(
        "vera@acme", "fido2", "k1", 4, version=version, now=NOW
    )
    loaded = await directory.load_credential("vera@acme", "fido2")
    assert loaded is not None and loaded.counters == {"k1": 5, "k2": 3}


async def test_key_added_meanwhile_does_not_fail_a_login_with_another_key(directory: Store) -> None:
    v1 = await directory.set_credential("vera@acme", "fido2", {"credentials": [{"id": "k1"}]}, NOW)
    assert await directory.advance_counter("vera@acme", "fido2", "k1", 1, version=v1, now=NOW)
    # k2 is registered while a login with k1 (which read v1) waits at the touch.
    two = {"credentials": [{"id": "k1"}, {"id": "k2"}]}
    assert await directory.replace_credential("vera@acme", "fido2", two, v1, NOW)
    assert await directory.advance_counter("vera@acme", "fido2", "k1", 2, version=v1, now=NOW)
    # k1 is removed while another login with it (read v2) waits: its count is refused.
    loaded = await directory.load_credential("vera@acme", "fido2")
    assert loaded is not None
    only_k2 = {"credentials": [{"id": "k2"}]}
    assert await directory.replace_credential(
        "vera@acme", "fido2", only_k2, loaded.version, NOW, drop_counters=("k1",)
    )
    assert not await directory.advance_counter(
        "vera@acme", "fido2", "k1", 3, version=loaded.version, now=NOW
    )
    after = await directory.load_credential("vera@acme", "fido2")
    assert after is not None and after.counters == {}


async def test_key_without_a_counter_must_still_be_registered(directory: Store) -> None:
    v1 = await directory.set_credential("vera@acme", "fido2", {"credentials": [{"id": "k0"}]}, NOW)
    for _ in range(2):  # always 0: nothing moves, the key is there
        assert await directory.advance_counter("vera@acme", "fido2", "k0", 0, version=v1, now=NOW)
    assert await directory.replace_credential(
        "vera@acme", "fido2", {"credentials": []}, v1, NOW, drop_counters=("k0",)
    )
    assert not await directory.advance_counter("vera@acme", "fido2", "k0", 0, version=v1, now=NOW)


async def test_totp_step_of_a_replaced_secret_never_counts(directory: Store) -> None:
    """A login parked with a stolen seed: the admin re-enrolls, the user logs in with the
    new seed (the step counter exists again), then the parked login answers with a
    later step of the old seed. The record-wide counter is bound to the version."""
    old = await directory.set_credential("vera@acme", "totp", {"secret": "OLD"}, NOW)
    new = await directory.set_credential(
        "vera@acme", "totp", {"secret": "NEW"}, NOW, reset_counters=True
    )
    assert await directory.advance_counter("vera@acme", "totp", "", 100, version=new, now=NOW)
    assert not await directory.advance_counter("vera@acme", "totp", "", 101, version=old, now=NOW)


async def test_stale_record_write_is_refused(directory: Store) -> None:
    """A key list written from an old copy does not undo a change made meanwhile."""
    v1 = await directory.set_credential("vera@acme", "fido2", {"credentials": [{"id": "k1"}]}, NOW)
    # An administrator removes k1 (from v1); a registration made from v1 comes in late.
    assert await directory.replace_credential("vera@acme", "fido2", {"credentials": []}, v1, NOW)
    late = {"credentials": [{"id": "k1"}, {"id": "k2"}]}
    assert not await directory.replace_credential("vera@acme", "fido2", late, v1, NOW)
    assert await directory.get_credential("vera@acme", "fido2") == {"credentials": []}
    # Counters of a login that read v1 are refused too.
    assert not await directory.advance_counter("vera@acme", "fido2", "k1", 9, version=v1, now=NOW)
    assert await directory.credential_version("vera@acme", "fido2") == v1 + 1
    # Deleting names the version as well.
    assert not await directory.delete_credential("vera@acme", "fido2", v1)
    assert await directory.delete_credential("vera@acme", "fido2", v1 + 1)
    assert await directory.credential_version("vera@acme", "fido2") is None
    assert not await directory.advance_counter("vera@acme", "fido2", "k1", 9, version=v1, now=NOW)


async def test_add_credential_only_when_absent(directory: Store) -> None:
    assert await directory.add_credential("vera@acme", "fido2", {"credentials": [{"id": "a"}]}, NOW)
    assert not await directory.add_credential(
        "vera@acme", "fido2", {"credentials": [{"id": "b"}]}, NOW
    )
    assert await directory.get_credential("vera@acme", "fido2") == {"credentials": [{"id": "a"}]}


async def test_counters_go_with_the_credential(directory: Store) -> None:
    version = await directory.set_credential("vera@acme", "totp", {"secret": TOTP_SECRET}, NOW)
    await directory.advance_counter("vera@acme", "totp", "", 7, version=version, now=NOW)
    await directory.delete_credential("vera@acme", "totp")
    assert await scalar(directory, "SELECT COUNT(*) FROM factor_counters") == 0


async def test_schema_1_database_is_upgraded(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    with sqlite3.connect(db_path) as db:
        db.executescript(
            "CREATE TABLE users (id TEXT PRIMARY KEY, kind TEXT NOT NULL, vendor TEXT, org TEXT,"
            " created REAL NOT NULL, disabled INTEGER NOT NULL DEFAULT 0,"
            " failures INTEGER NOT NULL DEFAULT 0, locked_until REAL NOT NULL DEFAULT 0);"
            "CREATE TABLE credentials (user TEXT NOT NULL, method TEXT NOT NULL,"
            " sealed BLOB NOT NULL, updated REAL NOT NULL, PRIMARY KEY (user, method));"
            "INSERT INTO users (id, kind, created, failures) VALUES ('old', 'vendor', 1, 2);"
            "PRAGMA user_version=1;"
        )
    db.close()
    store = Store(db_path, KEY)
    try:
        user = await store.get_user("old")
        assert user is not None and (user.failures, user.admin_locked) == (2, False)
        assert await store.begin_attempt("old", NOW, POLICY) is Attempt.GO
    finally:
        await store.close()


async def test_agents(directory: Store) -> None:
    assert await directory.get_agent("pc-1") == Agent(
        "pc-1",
        "clinic",
        disabled=False,
        enrolled=False,
        cert_fingerprint=None,
        noise_key=None,
        token_expires=NOW + 3600,
        last_seen=None,
    )
    assert await directory.get_agent("pc-2") is None
    await directory.touch_agent("pc-1", NOW + 5)
    agent = await directory.get_agent("pc-1")
    assert agent is not None and agent.last_seen == NOW + 5
    with pytest.raises(StoreError, match="no org 'ghost'"):
        await directory.add_agent("pc-9", "ghost", "t", expires=NOW + 1, now=NOW)


async def test_agent_rows_do_not_list_the_token_hash(directory: Store) -> None:
    (row,) = await directory.list_rows("agents")
    assert "token_hash" not in row
    assert token_hash("enroll-token-1") not in row.values()


async def test_agreements(directory: Store) -> None:
    await directory.add_agreement(
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
    await directory.add_agreement(
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
    assert await directory.agreements_between("acme", "clinic") == [
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
    assert await directory.agreements_between("acme", "hospital") == []
    with pytest.raises(StoreError, match="no vendor"):
        await directory.add_agreement(
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


async def test_agreement_acceptance_and_state(directory: Store) -> None:
    await directory.add_agreement(
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
    await directory.accept_agreement("a", "vendor", NOW + 1)
    await directory.accept_agreement("a", "org", NOW + 2)
    await directory.set_agreement_state("a", "suspended")
    agreement = await directory.get_agreement("a")
    assert agreement is not None
    assert (agreement.vendor_accepted, agreement.org_accepted) == (NOW + 1, NOW + 2)
    assert agreement.state == "suspended"
    assert await directory.get_agreement("b") is None
    with pytest.raises(StoreError):
        await directory.accept_agreement("b", "org", NOW)


async def test_grants(directory: Store) -> None:
    assert await directory.grants_of("emil@clinic") == set()
    await directory.add_grant("emil@clinic", "pc-1", NOW)
    assert await directory.grants_of("emil@clinic") == {"pc-1"}
    with pytest.raises(StoreError, match="already exists"):
        await directory.add_grant("emil@clinic", "pc-1", NOW)
    with pytest.raises(StoreError, match="no agent"):
        await directory.add_grant("emil@clinic", "pc-9", NOW)
    assert await directory.remove_grant("emil@clinic", "pc-1")
    assert not await directory.remove_grant("emil@clinic", "pc-1")
    assert await directory.grants_of("emil@clinic") == set()


async def test_disable_and_remove(directory: Store) -> None:
    await directory.set_disabled("vendors", "acme", True)
    assert await directory.vendor_disabled("acme") is True
    await directory.set_disabled("users", "vera@acme", True)
    user = await directory.get_user("vera@acme")
    assert user is not None and user.disabled
    with pytest.raises(StoreError, match="still referred to"):
        await directory.remove("vendors", "acme")  # vera still belongs to it
    await directory.remove("users", "vera@acme")
    await directory.remove("vendors", "acme")
    assert await directory.get_user("vera@acme") is None
    assert await directory.vendor_disabled("acme") is None
    with pytest.raises(StoreError, match="no user"):
        await directory.remove("users", "vera@acme")


async def test_removing_a_user_removes_credentials_and_grants(directory: Store) -> None:
    await directory.set_credential("emil@clinic", "password", {"hash": "h"}, NOW)
    await directory.add_grant("emil@clinic", "pc-1", NOW)
    await directory.remove("users", "emil@clinic")
    assert await scalar(directory, "SELECT COUNT(*) FROM credentials") == 0
    assert await scalar(directory, "SELECT COUNT(*) FROM grants") == 0


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
async def test_duplicate_ids(directory: Store, add: object) -> None:
    with pytest.raises(StoreError, match="already exists"):
        await add(directory)  # type: ignore[operator]


async def test_duplicate_agreement(directory: Store) -> None:
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
    await directory.add_agreement("a", **kw)  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="agreement 'a' already exists"):
        await directory.add_agreement("a", **kw)  # type: ignore[arg-type]


async def test_data_survives_reopening(db_path: Path) -> None:
    first = Store(db_path, KEY)
    await first.add_org("clinic", "Clinic", NOW)
    await first.add_user("emil@clinic", kind="employee", vendor=None, org="clinic", now=NOW)
    await first.set_credential("emil@clinic", "totp", {"secret": TOTP_SECRET}, NOW)
    await first.close()
    second = Store(db_path, KEY)
    try:
        assert await second.org_exists("clinic")
        assert await second.get_credential("emil@clinic", "totp") == {"secret": TOTP_SECRET}
    finally:
        await second.close()


async def test_newer_schema_is_refused(db_path: Path) -> None:
    await Store(db_path, KEY).close()
    with sqlite3.connect(db_path) as db:
        db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(StoreError, match="newer than this gatewayd"):
        Store(db_path, KEY)


# -- sealed credentials ----------------------------------------------------------------------------


async def test_credential_round_trip(directory: Store) -> None:
    assert await directory.get_credential("vera@acme", "totp") is None
    await directory.set_credential(
        "vera@acme", "totp", {"secret": TOTP_SECRET, "last_counter": 1}, NOW
    )
    assert await directory.get_credential("vera@acme", "totp") == {
        "secret": TOTP_SECRET,
        "last_counter": 1,
    }
    await directory.set_credential(
        "vera@acme", "totp", {"secret": TOTP_SECRET, "last_counter": 2}, NOW
    )
    assert await directory.get_credential("vera@acme", "totp") == {
        "secret": TOTP_SECRET,
        "last_counter": 2,
    }
    assert await directory.credential_methods("vera@acme") == ["totp"]
    assert await directory.delete_credential("vera@acme", "totp")
    assert not await directory.delete_credential("vera@acme", "totp")
    assert await directory.get_credential("vera@acme", "totp") is None


async def test_credential_for_unknown_user(store: Store) -> None:
    with pytest.raises(StoreError, match="no user"):
        await store.set_credential("ghost", "totp", {"secret": TOTP_SECRET}, NOW)


async def test_database_files_do_not_hold_the_secret(
    sqlite_directory: Store, db_path: Path
) -> None:
    directory = sqlite_directory
    await directory.set_credential("vera@acme", "totp", {"secret": TOTP_SECRET}, NOW)
    await directory.set_credential("vera@acme", "password", {"hash": "scrypt$15$8$1$salt$key"}, NOW)
    files = list(db_path.parent.iterdir())  # the database, its -wal and -shm
    assert db_path in files
    raw = b"".join(f.read_bytes() for f in files)
    assert b"vera@acme" in raw  # the search works: the user id is there in the clear
    assert TOTP_SECRET.encode() not in raw
    assert b"scrypt$15" not in raw
    sealed = await scalar(
        directory,
        """SELECT sealed FROM credentials WHERE "user" = ? AND method = 'totp'""",
        "vera@acme",
    )
    assert len(sealed) >= 12 + 16  # nonce and tag around the ciphertext


async def test_sealed_blob_moved_to_another_user_does_not_unseal(directory: Store) -> None:
    await directory.set_credential("vera@acme", "totp", {"secret": TOTP_SECRET}, NOW)
    await directory.set_credential("emil@clinic", "totp", {"secret": "OTHER"}, NOW)
    async with directory.tx() as db:
        await db.execute(
            """UPDATE credentials SET sealed = (SELECT sealed FROM credentials """
            """WHERE "user" = 'vera@acme' AND method = 'totp') """
            """WHERE "user" = 'emil@clinic' AND method = 'totp'"""
        )
    with pytest.raises(StoreError, match="does not unseal"):
        await directory.get_credential("emil@clinic", "totp")
    assert await directory.get_credential("vera@acme", "totp") == {"secret": TOTP_SECRET}


async def test_sealed_blob_moved_to_another_method_does_not_unseal(directory: Store) -> None:
    await directory.set_credential("vera@acme", "totp", {"secret": TOTP_SECRET}, NOW)
    async with directory.tx() as db:
        await db.execute(
            """INSERT INTO credentials SELECT "user", 'fido2', sealed, updated, version """
            """FROM credentials WHERE "user" = 'vera@acme' AND method = 'totp'"""
        )
    with pytest.raises(StoreError, match="does not unseal"):
        await directory.get_credential("vera@acme", "fido2")


async def test_tampered_blob_does_not_unseal(directory: Store) -> None:
    await directory.set_credential("vera@acme", "totp", {"secret": TOTP_SECRET}, NOW)
    async with directory.tx() as db:
        row = (await db.execute("SELECT sealed FROM credentials")).one()
        assert row is not None
        sealed = bytes(row["sealed"])
        flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
        await db.execute("UPDATE credentials SET sealed = ?", (flipped,))
    with pytest.raises(StoreError, match="does not unseal"):
        await directory.get_credential("vera@acme", "totp")


async def test_another_key_does_not_unseal(db_path: Path) -> None:
    first = Store(db_path, KEY)
    await first.add_org("clinic", "Clinic", NOW)
    await first.add_user("emil@clinic", kind="employee", vendor=None, org="clinic", now=NOW)
    await first.set_credential("emil@clinic", "totp", {"secret": TOTP_SECRET}, NOW)
    await first.close()
    other = Store(db_path, bytes(32))
    try:
        with pytest.raises(StoreError, match="does not unseal"):
            await other.get_credential("emil@clinic", "totp")
    finally:
        await other.close()


async def test_load_secrets_key(tmp_path: Path) -> None:
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


async def test_enrollment_token_is_single_use(directory: Store) -> None:
    assert (
        await directory.take_enrollment("enroll-token-1", "ab" * 32, "noise-key", NOW + 10)
        == "pc-1"
    )
    agent = await directory.get_agent("pc-1")
    assert agent is not None
    assert agent.enrolled
    assert (agent.cert_fingerprint, agent.noise_key, agent.token_expires) == (
        "ab" * 32,
        "noise-key",
        None,
    )
    assert await directory.take_enrollment("enroll-token-1", "cd" * 32, "other", NOW + 11) is None
    agent = await directory.get_agent("pc-1")
    assert agent is not None and agent.cert_fingerprint == "ab" * 32  # unchanged


async def test_enrollment_token_is_kept_hashed(sqlite_directory: Store, db_path: Path) -> None:
    directory = sqlite_directory
    stored = await scalar(directory, "SELECT token_hash FROM agents")
    assert stored == token_hash("enroll-token-1") != "enroll-token-1"
    raw = b"".join(f.read_bytes() for f in db_path.parent.iterdir())
    assert b"enroll-token-1" not in raw


async def test_enrollment_token_expires(directory: Store) -> None:
    assert await directory.take_enrollment("enroll-token-1", "ab", "k", NOW + 3600.001) is None
    agent = await directory.get_agent("pc-1")
    assert agent is not None and not agent.enrolled


async def test_enrollment_token_valid_until_its_expiry(directory: Store) -> None:
    assert await directory.take_enrollment("enroll-token-1", "ab", "k", NOW + 3600) == "pc-1"


async def test_wrong_enrollment_token(directory: Store) -> None:
    assert await directory.take_enrollment("enroll-token-2", "ab", "k", NOW) is None
    assert await directory.take_enrollment("", "ab", "k", NOW) is None


async def test_disabled_agent_cannot_enroll(directory: Store) -> None:
    await directory.set_disabled("agents", "pc-1", True)
    assert await directory.take_enrollment("enroll-token-1", "ab", "k", NOW) is None
    await directory.set_disabled("agents", "pc-1", False)
    assert await directory.take_enrollment("enroll-token-1", "ab", "k", NOW) == "pc-1"


async def test_each_agent_takes_its_own_token(directory: Store) -> None:
    await directory.add_agent("pc-2", "clinic", "enroll-token-2", expires=NOW + 3600, now=NOW)
    assert await directory.take_enrollment("enroll-token-2", "ab", "k2", NOW) == "pc-2"
    assert await directory.take_enrollment("enroll-token-1", "cd", "k1", NOW) == "pc-1"
    agent = await directory.get_agent("pc-1")
    assert agent is not None and agent.noise_key == "k1"


# -- one-time registration codes -------------------------------------------------------------------


async def test_registration_code(directory: Store) -> None:
    await directory.add_registration_code(
        "vera@acme", "fido2", "K7Q2-9XZA", expires=NOW + 600, by="root", now=NOW
    )
    assert (
        await directory.registration_code_state("vera@acme", "fido2", "K7Q2-9XZA", NOW) == "valid"
    )
    assert (
        await directory.registration_code_state("emil@clinic", "fido2", "K7Q2-9XZA", NOW)
        == "unknown"
    )
    assert (
        await directory.registration_code_state("vera@acme", "totp", "K7Q2-9XZA", NOW) == "unknown"
    )
    assert not await directory.take_registration_code("emil@clinic", "fido2", "K7Q2-9XZA", NOW)
    assert await directory.take_registration_code("vera@acme", "fido2", "K7Q2-9XZA", NOW + 1)
    assert not await directory.take_registration_code("vera@acme", "fido2", "K7Q2-9XZA", NOW + 2)
    assert await directory.registration_code_state("vera@acme", "fido2", "K7Q2-9XZA", NOW) == "used"


async def test_registration_code_expires(directory: Store) -> None:
    await directory.add_registration_code(
        "vera@acme", "fido2", "C0DE", expires=NOW + 600, by="root", now=NOW
    )
    assert (
        await directory.registration_code_state("vera@acme", "fido2", "C0DE", NOW + 601)
        == "expired"
    )
    assert not await directory.take_registration_code("vera@acme", "fido2", "C0DE", NOW + 601)


# -- two nodes on one PostgreSQL database: the shared state under attack --------------------


@pytest_asyncio.fixture
async def nodes(postgres_dsn: str) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores on one PostgreSQL database, as two gatewayd nodes have them."""
    a = await Store.open(postgres_dsn, KEY)
    b = await Store.open(postgres_dsn, KEY)
    await fill(a)
    yield a, b
    await a.close()
    await b.close()


async def test_a_totp_step_replayed_on_another_node_is_refused(nodes: tuple[Store, Store]) -> None:
    a, b = nodes
    version = await a.set_credential("vera@acme", "totp", {"secret": TOTP_SECRET}, NOW)
    assert await a.advance_counter("vera@acme", "totp", "", 100, version=version, now=NOW)
    assert not await b.advance_counter("vera@acme", "totp", "", 100, version=version, now=NOW)
    # The same code sent to both nodes at once: one login takes it.
    taken = await asyncio.gather(
        *(
            node.advance_counter("vera@acme", "totp", "", 101, version=version, now=NOW)
            for node in (a, b) * 5
        )
    )
    assert taken.count(True) == 1
    loaded = await b.load_credential("vera@acme", "totp")
    assert loaded is not None and loaded.counters == {"": 101}


async def test_a_step_of_a_seed_replaced_on_another_node_never_counts(
    nodes: tuple[Store, Store],
) -> None:
    a, b = nodes
    old = await a.set_credential("vera@acme", "totp", {"secret": "OLD"}, NOW)
    new, *_ = await asyncio.gather(
        b.set_credential("vera@acme", "totp", {"secret": "NEW"}, NOW, reset_counters=True),
        *(a.advance_counter("vera@acme", "totp", "", s, version=old, now=NOW) for s in range(5)),
    )
    # Whatever the order, no step of the old seed is left counted under the new one.
    assert new == old + 1
    loaded = await a.load_credential("vera@acme", "totp")
    assert loaded is not None and loaded.version == new and loaded.counters == {}
    assert not await a.advance_counter("vera@acme", "totp", "", 99, version=old, now=NOW)


async def test_parallel_failed_logins_on_two_nodes_lock_exactly_at_the_limit(
    nodes: tuple[Store, Store],
) -> None:
    """20 wrong guesses at once, half on each node: 5 (the threshold) are checked, and
    those 5 failures lock the account; no node gets a guess more."""
    a, b = nodes

    async def guess(node: Store) -> tuple[Attempt, AttemptEnd | None]:
        slot = await node.begin_attempt("vera@acme", NOW, POLICY)
        if slot is not Attempt.GO:
            return slot, None
        end = await node.end_attempt("vera@acme", ok=False, final=False, now=NOW, policy=POLICY)
        return slot, end

    results = await asyncio.gather(*(guess(node) for node in (a, b) * 10))
    ends = [end for slot, end in results if end is not None]
    assert len(ends) == POLICY.threshold
    assert {slot for slot, end in results if end is None} <= {Attempt.BUSY, Attempt.LOCKED}
    assert sorted(e.failures for e in ends) == [1, 2, 3, 4, 5]
    assert [e.newly_locked for e in ends if e.newly_locked] == [60]
    user = await b.get_user("vera@acme")
    assert user is not None and (user.failures, user.locked_until) == (5, NOW + 60)
    assert await a.begin_attempt("vera@acme", NOW + 1, POLICY) is Attempt.LOCKED
    assert await b.begin_attempt("vera@acme", NOW + 1, POLICY) is Attempt.LOCKED


async def test_a_fido2_counter_only_goes_up_across_nodes(nodes: tuple[Store, Store]) -> None:
    a, b = nodes
    record = {"credentials": [{"id": "k1"}]}
    version = await a.set_credential("vera@acme", "fido2", record, NOW)
    # A key and its clone answer on two nodes with the same and with older counts.
    counts = [5, 5, 3, 7, 6, 7, 2]
    moved = await asyncio.gather(
        *(
            node.advance_counter("vera@acme", "fido2", "k1", n, version=version, now=NOW)
            for node, n in zip((a, b) * 4, counts, strict=False)
        )
    )
    loaded = await b.load_credential("vera@acme", "fido2")
    assert loaded is not None and loaded.counters == {"k1": 7}
    # The order the nodes commit in is theirs to choose (3, 5, 6, 7 is as valid as 5, 7),
    # but a count is never taken twice: the two 5s and the two 7s move it once each at most.
    taken = [n for n, ok in zip(counts, moved, strict=True) if ok]
    assert len(taken) == len(set(taken)) and max(taken) == 7
    assert not await a.advance_counter("vera@acme", "fido2", "k1", 7, version=version, now=NOW)
    assert not await b.advance_counter("vera@acme", "fido2", "k1", 6, version=version, now=NOW)
    assert await b.advance_counter("vera@acme", "fido2", "k1", 8, version=version, now=NOW)


async def test_an_enrollment_token_is_taken_once_across_nodes(nodes: tuple[Store, Store]) -> None:
    a, b = nodes
    taken = await asyncio.gather(
        *(
            node.take_enrollment("enroll-token-1", f"{i:02x}" * 32, f"key-{i}", NOW)
            for i, node in enumerate((a, b) * 5)
        )
    )
    winners = [i for i, agent in enumerate(taken) if agent is not None]
    assert len(winners) == 1 and taken[winners[0]] == "pc-1"
    agent = await a.get_agent("pc-1")
    assert agent is not None and agent.noise_key == f"key-{winners[0]}"


async def test_a_registration_code_is_taken_once_across_nodes(nodes: tuple[Store, Store]) -> None:
    a, b = nodes
    await a.add_registration_code("vera@acme", "fido2", "C0DE", expires=NOW + 60, by="r", now=NOW)
    taken = await asyncio.gather(
        *(node.take_registration_code("vera@acme", "fido2", "C0DE", NOW) for node in (a, b) * 5)
    )
    assert taken.count(True) == 1


async def test_a_record_written_from_a_stale_copy_on_another_node_is_refused(
    nodes: tuple[Store, Store],
) -> None:
    a, b = nodes
    v1 = await a.set_credential("vera@acme", "fido2", {"credentials": [{"id": "k1"}]}, NOW)
    written = await asyncio.gather(
        a.replace_credential("vera@acme", "fido2", {"credentials": []}, v1, NOW),
        b.replace_credential("vera@acme", "fido2", {"credentials": [{"id": "k2"}]}, v1, NOW),
    )
    assert written.count(True) == 1
    assert await a.credential_version("vera@acme", "fido2") == v1 + 1


# -- a PostgreSQL outage -------------------------------------------------------------------------

RECONNECT_DEADLINE = 60.0
"""Seconds the pool has to be back after the server is (a bound, not an expectation)."""


async def test_an_outage_is_a_clear_error_and_the_pool_reconnects(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    store = await fill(await Store.open(postgres_dsn, KEY))
    try:
        postgres_server.stop()
        try:
            # A login's first store call: refused with the reason, no slot is taken.
            with pytest.raises(StoreError, match=r"the database .* (is unreachable|failed)"):
                await store.begin_attempt("vera@acme", NOW, POLICY)
            with pytest.raises(StoreError, match="unreachable"):
                await store.get_user("vera@acme")
        finally:
            postgres_server.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RECONNECT_DEADLINE
        while True:
            try:
                user = await store.get_user("vera@acme")
                break
            except StoreError:
                assert loop.time() < deadline, "the pool did not reconnect"
                await asyncio.sleep(0.1)
        assert user is not None and user.failures == 0 and user.kind == "vendor"
        assert await store.begin_attempt("vera@acme", NOW, POLICY) is Attempt.GO
    finally:
        await store.close()


# -- [cluster] database ----------------------------------------------------------------------------

CONFIG = """
[gateway]
listen = "127.0.0.1:8443"
[tls]
cert_file = "a"
key_file = "b"
ca_file = "c"
ca_key_file = "d"
[store]
path = "state/directory.db"
secrets_key_file = "k"
[audit]
path = "audit/audit.jsonl"
[admin]
socket = "run/admin.sock"
[cluster]
mqtt = "127.0.0.1:1883"
"""


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ('"sqlite:///x.db"', "expected a postgresql:// URI"),
        ('"host=db dbname=gw"', "expected a postgresql:// URI"),
        ('"postgresql://gw:secret@db/gw"', "no password here"),
        ('"postgresql://gw@db/gw?sslmode=require&password=secret"', "no password here"),
        ("5432", "cluster.database"),
    ],
)
async def test_the_database_is_a_postgresql_uri_without_a_password(value: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse(f"{CONFIG}database = {value}\n", Path("/etc/gatewayd/gatewayd.toml"))


async def test_the_database_key() -> None:
    where = Path("/etc/gatewayd/gatewayd.toml")
    dsn = "postgresql://gatewayd@db.example.org/gatewayd?sslmode=verify-full&passfile=/etc/pw"
    cfg = parse(f'{CONFIG}database = "{dsn}"\n', where)
    assert cfg.cluster is not None and cfg.cluster.database == dsn
    alone = parse(CONFIG, where)
    assert alone.cluster is not None and alone.cluster.database is None


async def test_the_dsn_in_messages_has_no_password() -> None:
    assert safe_dsn("postgresql://gw:s3cret@db/gw") == "postgresql://gw:***@db/gw"
    assert "s3cret" not in safe_dsn("host=db password=s3cret dbname=gw")


async def test_an_unreachable_database_at_start_is_a_clear_error(tmp_path: Path) -> None:
    dsn = f"postgresql:///gw?host={tmp_path}&user=gw"  # no server listens there
    with pytest.raises(StoreUnavailable, match=r"cannot (reach|use) the database .* within 1 s"):
        await Store.open(dsn, KEY, wait=1.0)


async def test_sqlite_commits_off_the_event_loop_and_reads_wait_for_them(
    sqlite_directory: Store,
) -> None:
    """A commit's fsync runs in a thread: the event loop serves others meanwhile, and a
    read that comes then waits for the commit and sees it."""
    backend = sqlite_directory.backend
    assert isinstance(backend, Sqlite)
    entered, release = threading.Event(), threading.Event()
    commit = backend._commit_now

    def held_commit() -> None:
        entered.set()
        assert release.wait(timeout=60)
        commit()

    backend._commit_now = held_commit  # type: ignore[method-assign]
    write = asyncio.create_task(sqlite_directory.set_disabled("users", "vera@acme", True))
    assert await asyncio.to_thread(entered.wait, 60)  # the loop runs on during the commit
    read = asyncio.create_task(sqlite_directory.get_user("vera@acme"))
    await asyncio.sleep(0)
    assert not read.done() and not write.done()
    release.set()
    await write
    user = await read
    assert user is not None and user.disabled


# -- gw login credentials --------------------------------------------------------------------------


def login(ident: str, user: str = "vera@acme") -> LoginCredential:
    return LoginCredential(
        id=ident,
        user=user,
        mode="access",
        public_key="pk",
        session="s-" + ident,
        source="127.0.0.1:1",
        created=NOW,
        expires=NOW + 3600,
        idle_timeout=600,
        last_used=NOW,
    )


async def test_login_credentials(directory: Store) -> None:
    await directory.add_login(login("c1"))
    await directory.add_login(login("c2"))
    assert await directory.get_login("c1") == login("c1")
    assert await directory.use_login("c1", NOW + 500)
    assert not await directory.use_login("c2", NOW + 601)  # idle too long
    await directory.keep_login("c2", NOW + 100)
    await directory.keep_login("c2", NOW + 50)  # never backwards
    c2 = await directory.get_login("c2")
    assert c2 is not None and c2.last_used == NOW + 100
    assert [c.id for c in await directory.logins_of("vera@acme", NOW)] == ["c1", "c2"]
    assert await directory.end_logins("vera@acme", NOW + 1, "logout", "c1") == ["c1"]
    assert await directory.end_logins("vera@acme", NOW + 2, "admin") == ["c2"]
    assert await directory.end_logins("vera@acme", NOW + 3, "admin") == []
    assert not await directory.use_login("c1", NOW + 4)


async def test_a_login_credential_is_ended_once_across_nodes(nodes: tuple[Store, Store]) -> None:
    a, b = nodes
    await a.add_login(login("c1"))
    ended = await asyncio.gather(
        *(node.end_logins("vera@acme", NOW, "logout", "c1") for node in (a, b) * 3)
    )
    assert sorted(ended) == [[], [], [], [], [], ["c1"]]
    assert not await b.use_login("c1", NOW + 1)
