""":func:`gatewayd.malloc.settle`, run once at the end of the daemon's start-up: start-up's
garbage is collected (not frozen for good), what is left is frozen out of the
collector's walks, and the heap's free pages go back to the system."""

from __future__ import annotations

import subprocess
import sys
import textwrap

PROBE = textwrap.dedent(
    """
    import gc, sys, weakref
    from gatewayd import malloc

    class Node:
        pass

    kept = [Node() for _ in range(1000)]
    garbage = Node()
    garbage.me = garbage  # a cycle only the collector frees
    gone = weakref.ref(garbage)
    del garbage
    gc.disable()  # no collection but settle's own
    before = gc.get_freeze_count()
    trimmed = malloc.settle()
    print(gone() is None, gc.get_freeze_count() - before >= len(kept), trimmed)
    """
)


def test_settle_collects_then_freezes_then_trims() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    collected, frozen, trimmed = done.stdout.split()
    assert collected == "True"  # garbage is not frozen with the rest
    assert frozen == "True"
    assert trimmed == str(sys.platform.startswith("linux"))  # glibc's malloc_trim
