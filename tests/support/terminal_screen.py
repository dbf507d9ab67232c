"""What a person sees on a terminal, for tests that run commands under a pty."""

from __future__ import annotations

import re


def screen(output: str) -> str:
    """What a terminal shows for ``output``: a carriage return goes back to the start of the
    line and ``ESC [ K`` erases the rest of it, so a progress line that ``gw connect``
    erased before its next message is gone, and one it left behind stays in sight."""
    shown = []
    for raw in output.replace("\r\n", "\n").split("\n"):
        line: list[str] = []
        col = 0
        for i, part in enumerate(re.split(r"(\r|\x1b\[K)", raw)):
            if i % 2 == 0:
                line[col : col + len(part)] = part
                col += len(part)
            elif part == "\r":
                col = 0
            else:
                del line[col:]
        shown.append("".join(line))
    return "\n".join(shown)
