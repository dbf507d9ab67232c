"""``gw agent run`` with a config file: flags win, and a bad file or a missing key is
one line naming where and what (in process, through click)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cli.agent import agent


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(agent, ["run", *args])
    return result.exit_code, result.stderr


def test_a_bad_file_is_one_line_naming_the_line_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "agent.toml"
    bad.write_text('state_dir = "s"\n\n[targets]\nrdp = 3389\n')
    code, err = run("--config", str(bad))
    assert code == 4
    assert err.splitlines() == [f'gw: {bad} line 4: targets.rdp: expected "HOST:PORT", got int']


def test_a_missing_file_named_by_config_is_an_error(tmp_path: Path) -> None:
    code, err = run("--config", str(tmp_path / "none.toml"))
    assert code == 4 and "cannot read" in err and "none.toml" in err


def test_without_state_dir_anywhere_the_file_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[targets]\necho = "127.0.0.1:1"\n')
    code, err = run("--config", str(cfg))
    assert code == 2 and f"give --state-dir, or state_dir in {cfg}" in err


def test_without_targets_anywhere(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('state_dir = "s"\n')
    code, err = run("--config", str(cfg))
    assert code == 2 and "give --target NAME=HOST:PORT, or a [targets] table in" in err


def test_the_files_values_are_used_and_flags_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What reaches the agent: the file's values unless flags replace them."""
    import relay.agent as relay_agent

    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    class FakeAgent:
        def __init__(self, state: Any, targets: dict[str, Any], **kw: Any) -> None:
            seen.update(kw, state_dir=state, targets=targets)
            raise Stop

    monkeypatch.setattr(relay_agent.AgentState, "load", staticmethod(lambda d: d))
    monkeypatch.setattr(relay_agent, "Agent", FakeAgent)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        'state_dir = "st"\ngateways = ["a:1", "b:2"]\napproval_command = "ask"\n'
        '[targets]\nrdp = "127.0.0.1:3389"\n[reconnect]\nfirst = 0.5\nmax = 5\n'
    )
    result = CliRunner().invoke(agent, ["run", "--config", str(cfg)])
    assert isinstance(result.exception, Stop), result.output
    assert seen["state_dir"] == tmp_path / "st"
    assert seen["targets"] == {"rdp": ("127.0.0.1", 3389)}
    assert seen["gateways"] == ("a:1", "b:2")
    assert (seen["backoff"].first, seen["backoff"].cap) == (0.5, 5.0)
    assert seen["approvals"].command == "ask"
    other = tmp_path / "other"
    flags = ["--state-dir", str(other), "--target", "ssh=127.0.0.1:22", "--gateway", "c:3"]
    result = CliRunner().invoke(agent, ["run", "--config", str(cfg), *flags])
    assert isinstance(result.exception, Stop), result.output
    assert seen["state_dir"] == other
    assert seen["targets"] == {"ssh": ("127.0.0.1", 22)}
    assert seen["gateways"] == ("c:3",)


def test_the_default_file_is_read_when_it_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text("prompt = 3\n")
    monkeypatch.setenv("GW_AGENT_CONFIG", str(cfg))
    code, err = run("--state-dir", str(tmp_path))
    assert code == 4 and "line 1: prompt: expected true or false" in err
    monkeypatch.setenv("GW_AGENT_CONFIG", str(tmp_path / "absent.toml"))
    code, err = run()
    assert code == 2 and "give --state-dir" in err  # no file there: flags alone


def test_approvals_find_the_state_folder_in_the_config_file(tmp_path: Path) -> None:
    """gw agent approvals/approve/deny take --config for the file's state_dir; --state-dir
    wins; neither is a usage error naming the file."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text('state_dir = "st"\n')
    for args in (["approvals"], ["approve", "r1"], ["deny", "r1"]):
        result = CliRunner().invoke(agent, [*args, "--config", str(cfg)])
        assert result.exit_code == 3, result.output
        assert f"cannot reach the agent at {tmp_path / 'st' / 'approval.sock'}" in result.stderr
        other = tmp_path / "other"
        result = CliRunner().invoke(agent, [*args, "--config", str(cfg), "--state-dir", str(other)])
        assert str(other / "approval.sock") in result.stderr
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    result = CliRunner().invoke(agent, ["approvals", "--config", str(empty)])
    assert result.exit_code == 2 and f"give --state-dir, or state_dir in {empty}" in result.stderr
