"""The operational log: journal lines with syslog priorities, JSON otherwise, one pipeline
for structlog and the standard library, a failed login as one warning line."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from gatewayd import logs
from gatewayd.event import AuthAttempt
from gatewayd.logs import journal_stream, render_journal


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        structlog.reset_defaults()
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)


def test_journal_stream_is_detected_by_device_and_inode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (tmp_path / "err").open("w") as stream, (tmp_path / "other").open("w") as other:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert journal_stream(stream)
        assert not journal_stream(other)  # a child's stderr redirected elsewhere
        monkeypatch.setenv("JOURNAL_STREAM", "junk")
        assert not journal_stream(stream)
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not journal_stream(stream)


def test_journal_lines_carry_the_priority_and_quote_what_could_forge_a_field() -> None:
    line = render_journal(
        None,
        "warning",
        {
            "event": "login failed",
            "level": "warning",
            "user": "eve source=1.2.3.4\n<3>x",
            "port": 5,
        },
    )
    assert line == '<4>login failed user="eve source=1.2.3.4\\n<3>x" port=5'
    assert "\n" not in line
    assert render_journal(None, "info", {"event": "ready", "level": "info"}) == "<6>ready"
    assert render_journal(None, "error", {"event": "x", "level": "error"}).startswith("<3>")
    assert render_journal(None, "debug", {"event": "x", "level": "debug"}).startswith("<7>")


def test_stdlib_and_structlog_records_share_the_pipeline(restore_logging: None) -> None:
    out = io.StringIO()
    assert logs.setup("info", out, fmt="journal") == "journal"
    logging.getLogger("asyncio").warning("Task exception was never retrieved: %s", "boom")
    structlog.get_logger("gatewayd.x").info("hello", n=1)
    logging.getLogger("chatty").debug("not shown at info")
    assert out.getvalue().splitlines() == [
        "<4>Task exception was never retrieved: boom",
        "<6>hello n=1",
    ]


def test_json_lines_otherwise(restore_logging: None) -> None:
    out = io.StringIO()
    assert logs.setup("info", out) == "json"  # a StringIO is not the journal
    logging.getLogger("aiomqtt").error("gone")
    record = json.loads(out.getvalue())
    assert (record["level"], record["logger"], record["event"]) == ("error", "aiomqtt", "gone")


def test_a_failed_login_is_one_warning_line_with_user_and_source(restore_logging: None) -> None:
    out = io.StringIO()
    logs.setup("info", out, fmt="journal")
    common: dict[str, Any] = dict(
        session="s", user="alice", mode="access", agent="pc1", reason="wrong password"
    )
    logs.log_failed_logins(
        AuthAttempt(factor="password", outcome="failure", source="[2001:db8::7]:50022", **common)
    )
    logs.log_failed_logins(AuthAttempt(factor="totp", outcome="success", source="x:1", **common))
    common["reason"] = "no answer from the client (eof)"  # gave up: no guess
    logs.log_failed_logins(AuthAttempt(factor="fido2", outcome="failure", source="x:1", **common))
    assert out.getvalue().splitlines() == [
        "<4>login failed user=alice source=2001:db8::7 port=50022 factor=password "
        'mode=access reason="wrong password"'
    ]
