"""Rate limits and lockout settings: the broker's keys and windows, the config keys.

No sockets, no sleeps."""

from __future__ import annotations

from pathlib import Path

import pytest
from gateway_config import MINIMAL

from gatewayd.broker import RateLimiter, source_key
from gatewayd.config import parse
from relay.errors import ConfigError


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


# -- the [lockout] and [limits] keys of this policy ----------------------------------------------


def test_lockout_and_limit_keys_parse(tmp_path: Path) -> None:
    cfg = parse(
        MINIMAL
        + "[limits]\nauth_per_user_per_minute = 7\n"
        + "[lockout]\ndecay_seconds = 7200\nhard_limit = 50\nmax_seconds = 600\n",
        tmp_path / "gatewayd.toml",
    )
    assert cfg.limits.auth_per_user_per_minute == 7
    assert (cfg.lockout.decay_seconds, cfg.lockout.hard_limit) == (7200, 50)
    defaults = parse(MINIMAL, tmp_path / "gatewayd.toml")
    assert defaults.limits.auth_per_user_per_minute == 20
    assert (defaults.lockout.decay_seconds, defaults.lockout.hard_limit) == (86400, 100)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        # One guess per lock period would be forgiven as fast as it is counted.
        ("[lockout]\ndecay_seconds = 3600\n", "lockout.decay_seconds: must be longer"),
        # NIST SP 800-63B 5.2.2: no more than 100 consecutive failures.
        ("[lockout]\nhard_limit = 101\n", "lockout.hard_limit: must be between 1 and 100"),
        ("[limits]\nauth_per_user_per_minute = 0\n", "limits.auth_per_user_per_minute"),
    ],
)
def test_lockout_keys_are_checked(tmp_path: Path, table: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(MINIMAL + table, tmp_path / "gatewayd.toml")
