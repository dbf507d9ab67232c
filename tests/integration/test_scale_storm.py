"""A crowd of connections larger than the handshake queues, against a real gatewayd.

One handshake slot (``max_handshakes = 1``), so four connections may wait for it
(gatewayd/admission.py, ``WAITING_PER_SLOT``). Silent peers (they never send a
ClientHello) fill the slot and the queue; the next connection is closed at once while
the waiting ones are still held, and the refusal is on the record. The handshake timeout
is long: nothing here ends by a timeout.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gatewayd.admission import WAITING_PER_SLOT
from gatewayd.demo import Lab

#: A bound on every wait: a hang fails the test, nothing is timed.
HANG = 60.0


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(tmp_path_factory.mktemp("storm"))
    lab.init(
        gateway_keys="handshake_timeout = 300\nmax_handshakes = 1\nmax_handshakes_per_source = 1"
    )
    lab.start_gateway()
    try:
        yield lab
    finally:
        lab.close()


def still_open(s: socket.socket) -> bool:
    """True while the gateway holds the connection (nothing to read, no end of file)."""
    s.setblocking(False)
    try:
        return s.recv(1) != b""
    except BlockingIOError:
        return True
    except ConnectionResetError:
        return False
    finally:
        s.setblocking(True)


def records(path: Path, event: str) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == event]


def test_past_the_queue_a_connection_is_closed_at_once_not_held(lab: Lab) -> None:
    silent = [socket.create_connection(("127.0.0.1", lab.port))]
    try:
        # One holds the slot; each of the next waits: the gateway reads none of them.
        for _ in range(WAITING_PER_SLOT):
            silent.append(socket.create_connection(("127.0.0.1", lab.port)))
        end = time.monotonic() + HANG
        turned_away: socket.socket | None = None
        while turned_away is None:
            # Accepting is asynchronous: the queue is full once one more is closed.
            s = socket.create_connection(("127.0.0.1", lab.port))
            s.settimeout(HANG)
            try:
                data = s.recv(1)
            except ConnectionResetError:
                data = b""
            except TimeoutError:
                s.close()
                pytest.fail("the gateway held a connection past its queue")
            s.close()
            if data != b"":  # pragma: no cover - the gateway never speaks first in TLS
                pytest.fail(f"unexpected bytes from the gateway: {data!r}")
            turned_away = s
            assert time.monotonic() < end
        # Those that wait are still held: the one turned away did not time out.
        assert all(still_open(s) for s in silent)
        while not any(
            r.get("message") == "too many TLS handshakes waiting; try again later"
            for r in records(lab.audit_path, "connection.rejected")
        ):
            assert time.monotonic() < end, "no connection.rejected record for the refusal"
            time.sleep(0.05)
    finally:
        for s in silent:
            s.close()
