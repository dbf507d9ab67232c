"""The daemon gives password hashes' memory back: parallel Argon2id checks in threads
leave the process about as big as it was (glibc's dynamic mmap threshold turned off)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import textwrap

import pytest

from gatewayd import malloc

PROBE = textwrap.dedent(
    """
    import sys, threading
    from gatewayd.malloc import return_big_blocks
    from auth import password

    def rss_kib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1])

    if sys.argv[1] == "fixed":
        assert return_big_blocks()
    stored = password.hash_password("a passphrase")
    password._IN_FLIGHT = threading.BoundedSemaphore(6)  # as many at once as the old code
    before = rss_kib()
    for _ in range(2):
        threads = [
            threading.Thread(target=password.check_password, args=(stored, "guess"))
            for _ in range(6)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    print(rss_kib() - before)
    """
)


def grown_kib(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_parallel_hashes_leave_no_resident_memory_behind() -> None:
    # Six checks hold 6 x 19 MiB while they run; afterwards, less than one check's worth
    # may stay (Python's own allocations) with the threshold fixed ...
    assert grown_kib("fixed") < 8 * 1024
    # ... and without it, glibc keeps most of it (what this module is for).
    assert grown_kib("default") > 38 * 1024


def test_threshold_maps_tls_read_buffers_and_hashes_on_their_own() -> None:
    # uvloop's per-connection TLS read buffer (256 KiB) and a hash's 19 MiB are both mapped
    # alone, so only their touched pages count and they go back whole.
    assert malloc.MMAP_THRESHOLD <= 256 * 1024


HOLES = textwrap.dedent(
    """
    import ctypes
    from gatewayd import malloc

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = (ctypes.c_void_p,)

    def rss_kib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1])

    # 64 MiB in 4 KiB blocks, written; then every block but one in 16 freed: holes
    # between live blocks, which glibc keeps (only the heap's top is given back).
    blocks = [libc.malloc(4096) for _ in range(16384)]
    for b in blocks:
        ctypes.memset(b, 1, 4096)
    for i, b in enumerate(blocks):
        if i % 16:
            libc.free(b)
    before = rss_kib()
    assert malloc.trim()
    print(before - rss_kib())
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_trim_gives_back_the_holes_a_burst_of_connections_leaves() -> None:
    out = subprocess.run([sys.executable, "-c", HOLES], capture_output=True, text=True, check=True)
    assert int(out.stdout) > 32 * 1024  # of the 60 MiB freed in holes, most goes back


def test_trim_every_runs_until_cancelled() -> None:
    async def main() -> None:
        task = asyncio.create_task(malloc.trim_every(0))
        for _ in range(3):
            await asyncio.sleep(0)
        assert not task.done() or not sys.platform.startswith("linux")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())
