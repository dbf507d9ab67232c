"""The card heartbeat's settings in ``[modes.*]`` (gatewayd/config.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_config import MINIMAL

from gatewayd.config import parse
from relay.errors import ConfigError


def _homeoffice(keys: str) -> str:
    return MINIMAL + f'\n[modes.homeoffice]\nfactors = ["smartcard", "password"]\n{keys}\n'


def test_defaults_and_values(tmp_path: Path) -> None:
    where = tmp_path / "gatewayd.toml"
    mode = parse(_homeoffice(""), where).mode("homeoffice")
    assert (mode.card_heartbeat, mode.card_heartbeat_timeout) == (5.0, 15.0)
    keys = "card_heartbeat = 2\ncard_heartbeat_timeout = 4"
    mode = parse(_homeoffice(keys), where).mode("homeoffice")
    assert (mode.card_heartbeat, mode.card_heartbeat_timeout) == (2.0, 4.0)


@pytest.mark.parametrize(
    ("keys", "key", "says"),
    [
        ("card_heartbeat = 0", "card_heartbeat", "between 1 and 60"),
        ("card_heartbeat_timeout = 1000", "card_heartbeat_timeout", "between 2 and 600"),
        ("card_heartbeat = 10\ncard_heartbeat_timeout = 15", "card_heartbeat_timeout", "twice"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, keys: str, key: str, says: str) -> None:
    where = tmp_path / "gatewayd.toml"
    with pytest.raises(ConfigError) as err:
        parse(_homeoffice(keys), where)
    assert err.value.key == f"modes.homeoffice.{key}"
    assert says in str(err.value)
