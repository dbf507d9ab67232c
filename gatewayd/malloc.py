"""The C allocator's settings for a daemon that hashes passwords in threads.

Each Argon2id check (``auth.password``) allocates its 19 MiB in one ``malloc`` in a
worker thread. glibc serves a block that big with ``mmap`` and returns it at ``free``,
but then raises its *dynamic* mmap threshold to the freed size, so the next checks are
carved out of the threads' heaps (an arena per thread) and stay resident after they
end: measured here, six checks in parallel left the process at 137 MiB RSS for good
instead of 21. Setting the threshold once turns the dynamic adjustment off (mallopt(3)),
so every block past it is mapped and unmapped again, and the heaps stay small.

The threshold stays at glibc's own starting value: uvloop gives every TLS connection a
256 KiB read buffer, of which only the pages a read reaches become resident when it is
mapped on its own; carved out of the heap instead (a threshold above it), each
connection cost 41 KiB of RSS instead of 30 (500 mutual-TLS connections, measured).

Many connections opened at once (agents coming back after a restart) leave the heap
full of small free holes between live blocks; glibc gives back only the free space at
its top. :func:`trim_every` asks it to give back every free page now and then
(malloc_trim(3)): measured with 500 agents connected at once, 70 KiB of RSS per agent
before, 51 after.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import sys

#: mallopt(3)'s parameter number for the mmap threshold (glibc's malloc.h).
M_MMAP_THRESHOLD = -3
#: Blocks at least this big are mapped on their own and returned at free: glibc's
#: starting value (M_MMAP_THRESHOLD's default), below uvloop's 256 KiB TLS read buffers
#: and far below a hash's 19 MiB.
MMAP_THRESHOLD = 128 * 1024
#: Seconds between two malloc_trim calls: each takes a few milliseconds of the event
#: loop with a heap of a hundred MiB; a burst of connections is given back within this.
TRIM_EVERY = 30.0


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def return_big_blocks() -> bool:
    """Fix glibc's mmap threshold; False where the C library is not glibc."""
    libc = _libc()
    try:
        mallopt = libc.mallopt if libc is not None else None
    except AttributeError:  # musl and others have no mallopt
        return False
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def trim() -> bool:
    """Give every free page of the heap back to the system; False without glibc."""
    libc = _libc()
    try:
        malloc_trim = libc.malloc_trim if libc is not None else None
    except AttributeError:
        return False
    if malloc_trim is None:
        return False
    malloc_trim.argtypes = (ctypes.c_size_t,)
    malloc_trim.restype = ctypes.c_int
    malloc_trim(0)
    return True


def settle() -> bool:
    """At the end of start-up: its garbage collected, what it made (the config, the store,
    the parts) frozen out of the collector's walks, and the heap pages it freed given
    back at once rather than at the first :func:`trim_every` tick (1.2 MiB of a default
    daemon's 50, measured). False without glibc (the collector part still ran)."""
    gc.collect()
    gc.freeze()
    return trim()


async def trim_every(seconds: float = TRIM_EVERY) -> None:
    """:func:`trim` every ``seconds``, for the life of the daemon (cancel to stop)."""
    while True:
        await asyncio.sleep(seconds)
        if not trim():
            return
