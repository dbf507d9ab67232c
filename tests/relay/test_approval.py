"""Approval at the machine shows and passes on what the vendor sent, escaped."""

from __future__ import annotations

import asyncio
import io
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest

from relay.approval import Approvals
from relay.text import is_printable

HOSTILE = {
    "user": "vendor-user",
    "vendor": "acme",
    "vendor_name": "Acme\x1b]0;owned\x07 AS\u202e",
    "mode": "support",
    "target": "echo",
    "reason": "\x1b[2J\x1b[Hall is fine\nAllow? [y/N] y\r\x9b1A",
    "sas": "12345",
}


def _controls(text: str) -> bool:
    return not is_printable(text.replace("\n", ""))


def test_terminal_prompt_has_no_control_characters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    terminal = io.StringIO()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(sys, "stdin", io.StringIO("n\n"))
    logged: list[dict[str, Any]] = []
    approvals = Approvals(
        tmp_path / "approval.sock", terminal=True, log=lambda e, **f: logged.append(f)
    )

    async def ask() -> tuple[bool, str, str]:
        return await approvals.ask("r1", timeout=30, **HOSTILE)

    approved, _by, _ = asyncio.run(ask())
    shown = terminal.getvalue()
    assert not approved and "Allow? [y/N] " in shown
    # Line breaks are the prompt's own; nothing the vendor sent breaks a line or escapes.
    assert not _controls(shown)
    assert shown.count("\n") == 5
    assert "\\x1b[2J\\x1b[Hall is fine\\x0aAllow?" in shown and "\\u202e" in shown
    assert all(is_printable(str(v)) for fields in logged for v in fields.values())


def test_approval_command_environment_has_no_control_characters(tmp_path: Path) -> None:
    dump = tmp_path / "env.txt"
    script = (
        f"{shlex.quote(sys.executable)} -c 'import os, json; print(json.dumps(dict(os.environ)))'"
    )
    approvals = Approvals(
        tmp_path / "approval.sock",
        command=f"{script} > {shlex.quote(str(dump))}; exit 1",
        terminal=False,
        log=lambda e, **f: None,
    )

    async def ask() -> tuple[bool, str, str]:
        return await approvals.ask("r2", timeout=30, **HOSTILE)

    approved, by, reason = asyncio.run(ask())
    assert (approved, by, reason) == (False, "approval_command", "exit 1")
    import json

    env = json.loads(dump.read_text())
    gw = {k: v for k, v in env.items() if k.startswith("GW_")}
    assert gw["GW_REASON"].startswith("\\x1b[2J") and gw["GW_VENDOR_NAME"].endswith("\\u202e")
    assert all(is_printable(v) for v in gw.values()), gw


def test_unattended_announcement_is_escaped(tmp_path: Path) -> None:
    dump = tmp_path / "env.txt"
    logged: list[tuple[str, dict[str, Any]]] = []
    approvals = Approvals(
        tmp_path / "approval.sock",
        command=f"printf '%s' \"$GW_REASON\" > {shlex.quote(str(dump))}",
        terminal=False,
        log=lambda e, **f: logged.append((e, f)),
    )
    asyncio.run(approvals.announce("start", user="u", reason="\x1b[2J\nx"))
    assert dump.read_text() == "\\x1b[2J\\x0ax"
    assert all(is_printable(str(v)) for _, f in logged for v in f.values())


def test_listing_on_the_local_socket_is_escaped(tmp_path: Path) -> None:
    approvals = Approvals(tmp_path / "approval.sock", terminal=False, log=lambda e, **f: None)

    async def listed() -> list[dict[str, Any]]:
        task = asyncio.ensure_future(approvals.ask("r3", timeout=30, **HOSTILE))
        await asyncio.sleep(0)
        rows = [r.describe() for r in approvals.pending.values()]
        approvals.answer("r3", False, "test")
        await task
        return rows

    (row,) = asyncio.run(listed())
    assert all(is_printable(str(v)) for v in row.values()), row


def test_long_reason_is_cut_on_the_terminal_but_whole_for_the_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reason = "ticket 4711 " + "x" * 1000
    request = {**HOSTILE, "reason": reason}
    terminal = io.StringIO()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(sys, "stdin", io.StringIO("n\n"))
    at_terminal = Approvals(tmp_path / "a.sock", terminal=True, log=lambda e, **f: None)
    assert asyncio.run(at_terminal.ask("r4", timeout=30, **request))[0] is False
    assert f"reason: {reason[:300]}...\n" in terminal.getvalue()

    dump = tmp_path / "reason.txt"
    by_command = Approvals(
        tmp_path / "b.sock",
        command=f"printf '%s' \"$GW_REASON\" > {shlex.quote(str(dump))}; exit 1",
        terminal=False,
        log=lambda e, **f: None,
    )
    assert asyncio.run(by_command.ask("r5", timeout=30, **request))[1] == "approval_command"
    assert dump.read_text() == reason
