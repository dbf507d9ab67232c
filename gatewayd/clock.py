"""Time, passed in: one :class:`Clock` for every part of the daemon.

``now()`` is wall time (POSIX seconds): what the audit records, session expiry and the
directory's timestamps use. ``monotonic()`` measures durations and idleness, which a
wall clock that jumps must not shorten or stretch. Tests hand in a clock they move
themselves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Clock:
    now: Callable[[], float] = time.time
    """Wall time, POSIX seconds."""
    monotonic: Callable[[], float] = time.monotonic
    """Seconds since some point; never jumps."""


class ManualClock:
    """A clock a test moves by hand: ``clock.advance(5)``; both readings move together."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.wall = start
        self.mono = 1000.0

    def now(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds

    def clock(self) -> Clock:
        return Clock(now=self.now, monotonic=self.monotonic)
