"""The daemon gives password hashes' memory back: parallel Argon2id checks in threads
leave the process about as big as it was (glibc's dynamic mmap threshold turned off)."""

from __future__ import annotations

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
