"""The store's ``gw login`` credentials on SQLite and on a real PostgreSQL server: each
use, ending and keeping moves by one conditional update, so a logout on one node and a
use on another never undo each other."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from gatewayd.store import LoginCredential, Store, StoreError

NOW = 1_700_000_000.0
KEY = bytes(range(32))

pytestmark = pytest.mark.asyncio


def credential(ident: str = "c1", user: str = "vera") -> LoginCredential:
    return LoginCredential(
        id=ident,
        user=user,
        mode="access",
        public_key="k" * 43,
        session="s-login",
        source="192.0.2.7:4000",
        created=NOW,
        expires=NOW + 43200,
        idle_timeout=1800,
        last_used=NOW,
    )


async def fill(store: Store) -> Store:
    await store.add_org("clinic", "Clinic", NOW)
    await store.add_vendor("acme", "ACME", NOW)
    await store.add_user("vera", kind="vendor", vendor="acme", org=None, now=NOW)
    await store.add_login(credential())
    return store


@pytest_asyncio.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        s = Store(tmp_path / "directory.db", KEY)
    else:
        s = await Store.open(request.getfixturevalue("postgres_dsn"), KEY)
    yield await fill(s)
    await s.close()


async def test_round_trip_and_uses(store: Store) -> None:
    assert await store.get_login("c1") == credential()
    assert await store.get_login("nope") is None
    with pytest.raises(StoreError, match="already exists"):
        await store.add_login(credential())
    assert await store.use_login("c1", NOW + 1799)
    assert await store.use_login("c1", NOW + 3500)  # idle time counts from the last use
    assert not await store.use_login("c1", NOW + 3500 + 1800)  # idle 30 minutes
    got = await store.get_login("c1")
    assert got is not None and got.last_used == NOW + 3500
    assert [c.id for c in await store.logins_of("vera", NOW + 3600)] == ["c1"]
    assert await store.logins_of("vera", NOW + 5400) == []


async def test_expiry_and_ending(store: Store) -> None:
    for step in range(1, 25):  # used every 30 minutes less a second: still ends at 12 h
        when = NOW + step * 1799
        assert await store.use_login("c1", when)
    assert not await store.use_login("c1", NOW + 43200)  # 12 hours, however used
    await store.add_login(credential("c2"))
    assert await store.end_logins("vera", NOW + 10, "logout", "c2") == ["c2"]
    assert not await store.use_login("c2", NOW + 11)
    assert await store.end_logins("vera", NOW + 12, "again") == ["c1"]
    ended = await store.get_login("c2")
    assert ended is not None and (ended.ended, ended.ended_reason) == (NOW + 10, "logout")
    await store.keep_login("c2", NOW + 100)  # an ended credential is not kept alive
    kept = await store.get_login("c2")
    assert kept is not None and kept.last_used == NOW


async def test_keep_never_goes_back(store: Store) -> None:
    await store.keep_login("c1", NOW + 600)
    await store.keep_login("c1", NOW + 300)
    got = await store.get_login("c1")
    assert got is not None and got.last_used == NOW + 600


async def test_a_logout_on_one_node_and_uses_on_another(postgres_dsn: str) -> None:
    """Two stores on one database (two nodes): after the end commits, no use passes."""
    a = await fill(await Store.open(postgres_dsn, KEY))
    b = await Store.open(postgres_dsn, KEY)
    try:
        uses = [b.use_login("c1", NOW + i) for i in range(1, 20)]
        results = await asyncio.gather(a.end_logins("vera", NOW + 10, "logout"), *uses)
        assert results[0] == ["c1"]
        assert not await b.use_login("c1", NOW + 30)
        got = await a.get_login("c1")
        assert got is not None and got.ended_reason == "logout"
    finally:
        await a.close()
        await b.close()
