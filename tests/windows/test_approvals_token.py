"""The approvals endpoint where the kernel names no peer (Windows): loopback TCP
guarded by a token file only the agent's user can read. Forced on Linux here
(GW_APPROVALS_TCP) so that every attack runs on every machine."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path
from typing import Any

import pytest

from relay import approval, platform
from relay.approval import Approvals, request, token_path
from relay.errors import GatewayError

ASK = {
    "user": "alice",
    "vendor": "acme",
    "vendor_name": "Acme",
    "mode": "support",
    "target": "rdp",
    "reason": "ticket 1",
    "sas": "12345",
}


@pytest.fixture(autouse=True)
def _tcp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_APPROVALS_TCP", "1")


async def _raw(port: int, body: dict[str, Any]) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(json.dumps(body).encode() + b"\n")
    await writer.drain()
    line = await reader.readline()
    writer.close()
    reply: dict[str, Any] = json.loads(line)
    return reply


def test_the_token_file_is_private_and_the_endpoint_is_loopback(tmp_path: Path) -> None:
    approvals = Approvals(tmp_path / "approval.sock", terminal=False, log=lambda e, **f: None)

    async def main() -> None:
        await approvals.start()
        assert approvals._server is not None
        hosts = {s.getsockname()[0] for s in approvals._server.sockets}
        assert hosts == {"127.0.0.1"}
        path = token_path(tmp_path / "approval.sock")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert not (tmp_path / "approval.sock").exists()
        await approvals.close()
        assert not path.exists()

    asyncio.run(main())


def test_without_the_token_nobody_lists_or_answers(tmp_path: Path) -> None:
    """A local process that cannot read the token file (another user) connects to the
    port: it learns nothing and approves nothing, with or without a guessed token."""
    approvals = Approvals(tmp_path / "approval.sock", terminal=False, log=lambda e, **f: None)

    async def main() -> tuple[list[dict[str, Any]], tuple[bool, str, str]]:
        await approvals.start()
        port = json.loads(token_path(tmp_path / "approval.sock").read_text())["port"]
        asking = asyncio.ensure_future(approvals.ask("r1", timeout=30, **ASK))
        while "r1" not in approvals.pending:
            await asyncio.sleep(0)
        replies = [
            await _raw(port, {"op": "list"}),
            await _raw(port, {"op": "approve", "id": "r1"}),
            await _raw(port, {"op": "approve", "id": "r1", "token": "0" * 64}),
            await _raw(port, {"op": "approve", "id": "r1", "token": ["x"]}),
        ]
        assert "r1" in approvals.pending and not asking.done()
        listed = await request(tmp_path / "approval.sock", "list")
        await request(tmp_path / "approval.sock", "approve", id="r1")
        answer = await asking
        await approvals.close()
        assert all(r == {"ok": False, "error": "wrong approvals token"} for r in replies), replies
        return listed, answer

    listed, (approved, by, _) = asyncio.run(main())
    assert [row["id"] for row in listed] == ["r1"]
    assert approved and by == f"{platform.user_name()} (token)"


def test_a_missing_or_damaged_token_file_is_one_clear_error(tmp_path: Path) -> None:
    sock = tmp_path / "approval.sock"
    with pytest.raises(GatewayError, match=r"cannot reach the agent at .*approval\.token"):
        asyncio.run(request(sock, "list"))
    token_path(sock).write_text("{not json")
    with pytest.raises(GatewayError, match=r"approval\.token is damaged"):
        asyncio.run(request(sock, "list"))


def test_the_unix_socket_stays_where_the_kernel_names_the_peer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GW_APPROVALS_TCP")
    assert approval._use_unix_socket() is platform.unix_peer_credentials()


def test_gw_keeps_its_files_under_appdata_on_windows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cli.common import config_home as _config_home

    monkeypatch.setattr(platform, "WINDOWS", True)
    monkeypatch.setenv("APPDATA", str(tmp_path / "Roaming"))
    assert _config_home() == tmp_path / "Roaming" / "gw"
    monkeypatch.setattr(platform, "WINDOWS", False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert _config_home() == tmp_path / "xdg" / "gw"


def test_private_files_are_new_owner_only_files_never_followed_links(tmp_path: Path) -> None:
    """Key and token files: mode 0600 whatever was there; a link planted at the path
    (to make the agent write its key where others read) is replaced, not followed."""
    victim = tmp_path / "elsewhere"
    victim.write_bytes(b"untouched")
    planted = tmp_path / "noise.key"
    planted.symlink_to(victim)
    platform.write_private(planted, b"secret")
    assert victim.read_bytes() == b"untouched"
    assert not planted.is_symlink() and planted.read_bytes() == b"secret"
    assert stat.S_IMODE(planted.stat().st_mode) == 0o600
    loose = tmp_path / "agent.key"
    loose.write_bytes(b"old")
    loose.chmod(0o644)
    platform.write_private(loose, b"new")
    assert stat.S_IMODE(loose.stat().st_mode) == 0o600 and loose.read_bytes() == b"new"
