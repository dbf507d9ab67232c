"""Text from the wire, made safe for a terminal or an environment variable.

Names, reasons and error messages that a peer chose travel to terminals (the
approval prompt, ``gw connect``'s errors, ``gw audit``) and into the environment of
programs (``approval_command``). A peer that can put an escape sequence there can
clear a screen, rewrite what the person reads or hide a line; a bidi override can
show text in another order than it is stored. :func:`printable` turns every such
character into a visible escape, and :func:`is_printable` tells whether a text
needs none (input that is checked at the door, like ``--reason``).

Escaped: the C0 controls and DEL and the C1 controls (Unicode category Cc, which
includes newline and tab), lone surrogates (Cs), the line and paragraph separators
(Zl, Zp) and the bidirectional formatting characters (Unicode TR 9, section 2).
A character up to U+00FF becomes ``\\xNN``, others ``\\uNNNN``. Everything else,
including non-Latin scripts, passes unchanged.

:func:`parse_hostport` reads a ``HOST:PORT`` typed in a flag or a config file.
"""

from __future__ import annotations

import unicodedata

from .errors import GatewayError

#: Unicode TR 9 section 2 (explicit directional formatting characters and marks):
#: ALM, LRM, RLM, LRE..RLO, LRI..PDI.
BIDI_CONTROLS = frozenset(
    ["\u061c", "\u200e", "\u200f"]
    + [chr(c) for c in range(0x202A, 0x202F)]
    + [chr(c) for c in range(0x2066, 0x206A)]
)

_UNSAFE_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})

#: What :func:`printable` appends to a text it cut at ``limit``.
ELLIPSIS = "..."


def _unsafe(ch: str) -> bool:
    return ch in BIDI_CONTROLS or unicodedata.category(ch) in _UNSAFE_CATEGORIES


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(text: str, limit: int | None = None) -> str:
    """``text`` with every control, separator and bidi character escaped.

    With ``limit``, at most ``limit`` characters of ``text`` are kept (counted
    before escaping) and :data:`ELLIPSIS` marks the cut.
    """
    cut = limit is not None and len(text) > limit
    if cut:
        text = text[: max(limit or 0, 0)]
    out = "".join(_escape(ch) if _unsafe(ch) else ch for ch in text)
    return out + ELLIPSIS if cut else out


def is_printable(text: str) -> bool:
    """True when :func:`printable` would leave ``text`` unchanged (no limit)."""
    return not any(_unsafe(ch) for ch in text)


def parse_hostport(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as typed in a flag or a config; GatewayError if not."""
    host, sep, port = value.rpartition(":")
    # isdigit() alone takes "²" and any number of digits, which int() then refuses.
    digits = port.isascii() and port.isdigit() and len(port) <= 5
    if not sep or not host or not digits or not 0 < int(port) < 65536:
        raise GatewayError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)
