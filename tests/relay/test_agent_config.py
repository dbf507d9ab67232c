"""The agent's config file: every key read, every mistake one line naming where and what."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.agent_config import AgentConfig, AgentConfigError, default_path, load, parse

FULL = b"""
state_dir = "state"
gateways = ["gw1.example.org:8443", "[2001:db8::1]:8443"]
approval_command = "/usr/local/bin/ask"
prompt = false

[targets]
rdp = "127.0.0.1:3389"
"ssh.main" = "localhost:22"

[reconnect]
first = 0.5
max = 30
"""


def test_every_key(tmp_path: Path) -> None:
    cfg = parse(FULL, tmp_path / "agent.toml")
    assert cfg == AgentConfig(
        path=tmp_path / "agent.toml",
        state_dir=tmp_path / "state",  # relative to the file's folder
        gateways=("gw1.example.org:8443", "[2001:db8::1]:8443"),
        targets=(("rdp", "127.0.0.1", 3389), ("ssh.main", "localhost", 22)),
        approval_command="/usr/local/bin/ask",
        prompt=False,
        backoff_first=0.5,
        backoff_max=30.0,
    )


def test_an_empty_file_says_nothing(tmp_path: Path) -> None:
    assert parse(b"", tmp_path / "a.toml") == AgentConfig(tmp_path / "a.toml")


def test_absolute_state_dir_and_load_from_disk(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text('state_dir = "/var/lib/gw-agent"\n')
    assert load(f).state_dir == Path("/var/lib/gw-agent")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('state_dir = "x"\nprompt = tru\n', "not valid TOML: Invalid value (at line 2, column 10)"),
        ("state_dir = 3\n", "line 1: state_dir: expected a folder path"),
        ("colour = 1\n", "line 1: colour: unknown key (known: approval_command, gateways"),
        ('gateways = "gw:1"\n', "line 1: gateways: expected a non-empty list"),
        ("gateways = []\n", "gateways: expected a non-empty list"),
        ('\n\ngateways = ["gw:1", 5]\n', 'line 3: gateways[1]: expected "HOST:PORT", got int'),
        ('gateways = ["gw:99999"]\n', "gateways[0]: expected HOST:PORT, got 'gw:99999'"),
        ('targets = "rdp"\n', 'targets: expected a table of NAME = "HOST:PORT"'),
        ('[targets]\n"a b" = "h:1"\n', "line 2: targets.a b: a target name is letters"),
        ("[targets]\nrdp = 3389\n", 'line 2: targets.rdp: expected "HOST:PORT", got int'),
        ('[targets]\nrdp = "3389"\n', "line 2: targets.rdp: expected HOST:PORT, got '3389'"),
        ("approval_command = ''\n", "approval_command: expected a command line"),
        ('prompt = "no"\n', "line 1: prompt: expected true or false"),
        ("reconnect = 5\n", "line 1: reconnect: expected a table"),
        ("[reconnect]\nfirst = 0\n", "line 2: reconnect.first: must be between 0.05 and 86400"),
        ("[reconnect]\nmax = true\n", "line 2: reconnect.max: expected a number of seconds"),
        ("[reconnect]\nfirst = 10\nmax = 5\n", "line 3: reconnect.max: must be at least"),
        ("[reconnect]\njitter = 1\n", "line 2: reconnect.jitter: unknown key (known: first, max)"),
    ],
)
def test_mistakes_are_one_line_with_where_and_what(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(AgentConfigError) as info:
        parse(text.encode(), tmp_path / "agent.toml")
    got = str(info.value)
    assert got.startswith(str(tmp_path / "agent.toml")), got
    assert message in got, got
    assert "\n" not in got


def test_not_utf8_and_unreadable(tmp_path: Path) -> None:
    with pytest.raises(AgentConfigError, match="not UTF-8"):
        parse(b'state_dir = "\xff"\n', tmp_path / "a.toml")
    with pytest.raises(AgentConfigError, match=r"cannot read .*missing\.toml"):
        load(tmp_path / "missing.toml")


def test_default_path_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GW_AGENT_CONFIG", raising=False)
    assert default_path() == Path("/etc/gw-agent/agent.toml")
    monkeypatch.setenv("GW_AGENT_CONFIG", "/srv/agent.toml")
    assert default_path() == Path("/srv/agent.toml")


def test_the_shipped_example_is_valid() -> None:
    # systemd/gw-agent.service runs the agent from this file's keys.
    example = Path(__file__).parents[2] / "systemd" / "agent.example.toml"
    cfg = load(example)
    assert cfg.targets == (("rdp", "127.0.0.1", 3389),)
    assert cfg.prompt is False
