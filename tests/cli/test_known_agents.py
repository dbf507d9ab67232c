"""``gw known-agents list/forget`` behave as ``ssh-keygen -R`` does with known_hosts:
forget drops every entry of the agent (or one gateway's), prints what it dropped,
keeps the old file as FILE.old, and an agent that is not there is said so with exit 0."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from cli.main import main
from relay import noise

FP_A = noise.fingerprint(b"a" * 32)
FP_B = noise.fingerprint(b"b" * 32)
FP_C = noise.fingerprint(b"c" * 32)


def gw(path: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["known-agents", *args, "--known-agents", str(path)])
    return result.exit_code, result.stdout, result.stderr


def filled(tmp_path: Path) -> Path:
    path = tmp_path / "known_agents.json"
    for agent, gateway, fp in (
        ("pc1", "gw1.example.org:8443", FP_A),
        ("pc1", "gw2.example.org:8443", FP_B),
        ("pc2", "gw1.example.org:8443", FP_C),
    ):
        assert gw(path, "add", agent, fp, "--gateway", gateway)[0] == 0
    return path


def test_list_shows_every_entry(tmp_path: Path) -> None:
    path = filled(tmp_path)
    code, out, _ = gw(path, "list")
    assert code == 0
    assert out.splitlines() == [
        f"gw1.example.org:8443 pc1 {FP_A}",
        f"gw1.example.org:8443 pc2 {FP_C}",
        f"gw2.example.org:8443 pc1 {FP_B}",
    ]
    code, out, _ = gw(path, "list", "--gateway", "gw2.example.org:8443", "--json")
    assert json.loads(out) == [
        {"gateway": "gw2.example.org:8443", "agent": "pc1", "fingerprint": FP_B}
    ]


def test_forget_drops_the_agent_everywhere_and_keeps_the_old_file(tmp_path: Path) -> None:
    path = filled(tmp_path)
    before = path.read_bytes()
    code, out, err = gw(path, "forget", "pc1")
    assert code == 0
    assert out.splitlines() == [
        f"# agent pc1 at gw1.example.org:8443 found: {FP_A}",
        f"# agent pc1 at gw2.example.org:8443 found: {FP_B}",
    ]
    assert err.splitlines() == [f"{path} updated.", f"Original contents retained as {path}.old"]
    assert path.with_name("known_agents.json.old").read_bytes() == before
    assert gw(path, "list")[1].splitlines() == [f"gw1.example.org:8443 pc2 {FP_C}"]


def test_forget_one_gateways_entry(tmp_path: Path) -> None:
    path = filled(tmp_path)
    code, out, _ = gw(path, "forget", "pc1", "--gateway", "gw2.example.org:8443")
    assert code == 0 and out == f"# agent pc1 at gw2.example.org:8443 found: {FP_B}\n"
    assert len(gw(path, "list")[1].splitlines()) == 2


def test_forget_an_unknown_agent_is_not_an_error(tmp_path: Path) -> None:
    path = filled(tmp_path)
    before = path.read_bytes()
    code, out, err = gw(path, "forget", "pc9")
    assert (code, out) == (0, "")
    assert err == f"agent pc9 not found in {path}\n"
    assert path.read_bytes() == before and not path.with_name("known_agents.json.old").exists()
    # No file at all: nothing known, the same answer.
    code, _, err = gw(tmp_path / "none.json", "forget", "pc1")
    assert code == 0 and "not found" in err


def test_forget_with_a_broken_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "known_agents.json"
    path.write_text("[1, 2]")
    code, _, err = gw(path, "forget", "pc1")
    assert code == 4 and err == f"gw: known agents file {path} is not a JSON object\n"
