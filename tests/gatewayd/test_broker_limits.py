"""Rate-limit keys and windows of the broker (gatewayd/broker.py): no sockets, no sleeps."""

from __future__ import annotations

import pytest

from gatewayd.broker import RateLimiter, source_key


@pytest.mark.parametrize(
    ("peer", "key"),
    [
        ("192.0.2.7:50000", "192.0.2.7"),
        ("[2001:db8:1:2:aaaa:bbbb:cccc:dddd]:443", "2001:db8:1:2::/64"),
        ("[2001:db8:1:2::1]:1", "2001:db8:1:2::/64"),
        ("[2001:db8:1:3::1]:1", "2001:db8:1:3::/64"),
        ("[::1]:5000", "::/64"),
        ("[::ffff:192.0.2.9]:5000", "192.0.2.9"),  # an IPv4 client on a dual-stack socket
        ("[fe80::1%eth0]:22", "fe80::/64"),
        ("unix-socket", "unix-socket"),
    ],
)
def test_source_key(peer: str, key: str) -> None:
    assert source_key(peer) == key


def test_one_ipv6_slash_64_shares_one_budget() -> None:
    """A host that owns a /64 (SLAAC, privacy addresses) gets one budget, not 2**64."""
    limiter = RateLimiter(3)
    answers = [
        limiter.allow(source_key(f"[2001:db8:0:7::{i:x}]:1000"), now=100.0) for i in range(1, 6)
    ]
    assert answers == [True, True, True, False, False]
    # The neighbouring /64 is another source.
    assert limiter.allow(source_key("[2001:db8:0:8::1]:1000"), now=100.0)
    # The window slides: a minute later the first /64 may try again.
    assert limiter.allow(source_key("[2001:db8:0:7::99]:1000"), now=160.0)


def test_user_names_are_limited_like_sources() -> None:
    limiter = RateLimiter(2)
    assert [limiter.allow("vera@acme", now=0.0) for _ in range(3)] == [True, True, False]
    assert limiter.allow("emil@clinic", now=0.0)
