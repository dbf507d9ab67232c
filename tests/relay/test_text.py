"""Escaping text from the wire before it reaches a terminal or an environment."""

from __future__ import annotations

import pytest

from relay.text import ELLIPSIS, is_printable, printable


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain text", "plain text"),
        ("Grüße, 東京", "Grüße, 東京"),
        ("\x1b[2J", "\\x1b[2J"),
        ("a\nb\r\tc", "a\\x0ab\\x0d\\x09c"),
        ("\x00\x7f", "\\x00\\x7f"),
        ("\x9b31m", "\\x9b31m"),  # C1 CSI
        ("abc\u202edcba", "abc\\u202edcba"),  # right-to-left override
        ("x\u2066y\u2069", "x\\u2066y\\u2069"),
        ("line\u2028sep", "line\\u2028sep"),
        ("\ud800", "\\ud800"),  # a lone surrogate
        ("back\\slash", "back\\slash"),
    ],
)
def test_printable_escapes_controls(raw: str, shown: str) -> None:
    assert printable(raw) == shown
    assert is_printable(raw) == (raw == shown)


def test_printable_result_has_no_controls() -> None:
    every = "".join(chr(c) for c in range(0x2100)) + "\u2028\u2029\u202e"
    assert is_printable(printable(every))


def test_printable_limit_cuts_before_escaping() -> None:
    assert printable("abcdef", limit=3) == "abc" + ELLIPSIS
    assert printable("abc", limit=3) == "abc"
    assert printable("\x1b\x1b\x1b", limit=2) == "\\x1b\\x1b" + ELLIPSIS
    assert printable("abc", limit=0) == ELLIPSIS


@pytest.mark.parametrize("reason", ["\x1b[2J", "line\nbreak", "tab\there", "rtl\u202e", "\x9b"])
def test_client_hello_refuses_a_reason_that_is_not_printable(reason: str) -> None:
    from relay import message as m
    from relay.errors import ProtocolError

    hello = {"t": "client_hello", "user": "u", "agent": "a", "target": "t", "mode": "access"}
    key = {"client_key": "A" * 43}
    with pytest.raises(ProtocolError, match=r"client_hello\.reason"):
        m.from_json({**hello, **key, "reason": reason})
    assert m.from_json({**hello, **key, "reason": "ticket 4711: Grüße"})
