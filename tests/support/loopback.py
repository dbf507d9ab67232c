"""Two real loopback TCP connections whose server ends are transports on the running
loop: what a :class:`relay.aio.Pipe` splices, with a plain blocking socket (the
"application") at each far end."""

from __future__ import annotations

import asyncio
import socket

from relay.aio import PausedProtocol


async def splice_ends(timeout: float) -> tuple[list[socket.socket], list[asyncio.Transport]]:
    """Two applications' sockets (blocking, ``timeout`` each) and the two transports
    a pipe between them splices."""
    loop = asyncio.get_running_loop()
    apps: list[socket.socket] = []
    ends: list[asyncio.Transport] = []
    for _ in range(2):
        listener = socket.create_server(("127.0.0.1", 0))
        app = socket.create_connection(listener.getsockname())
        conn, _ = listener.accept()
        listener.close()
        conn.setblocking(False)
        t, _ = await loop.connect_accepted_socket(PausedProtocol, conn)
        app.settimeout(timeout)
        apps.append(app)
        ends.append(t)
    return apps, ends
