"""The gateway's TLS context sends no session tickets (relay/tls.py).

Two tickets after every handshake were 40 % of a mutual-TLS handshake's processor time at
the gateway, and no client of the gateway resumes a session: a crowd of agents coming
back after a restart must not pay for them. In memory, no sockets.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from gatewayd import ca
from relay import tls


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The gateway's certificate, its key, and the CA that signed it (PEM files)."""
    ca_key, ca_cert = ca.make_ca("test CA")
    key, certificate = ca.make_server_cert(ca_key, ca_cert, ["gateway.test"])
    directory = tmp_path_factory.mktemp("tls")
    files = directory / "cert.pem", directory / "key.pem", directory / "ca.pem"
    files[0].write_bytes(ca.cert_pem(certificate))
    files[1].write_bytes(ca.key_pem(key))
    files[2].write_bytes(ca.cert_pem(ca_cert))
    return files


def session_after_a_round_trip(server_ctx: ssl.SSLContext, ca: Path) -> ssl.SSLSession:
    """The client's TLS session once the handshake is done and a byte came back (a
    TLS 1.3 server sends its tickets after the handshake: the client sees them then)."""
    client_ctx = tls.client_context(ca)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="gateway.test")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for side, obj in (("client", client), ("server", server)):
            if not done[side]:
                try:
                    obj.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    assert all(done.values())
    server.write(b"x")
    c_in.write(s_out.read())
    assert client.read(1) == b"x"
    session = client.session
    assert session is not None
    return session


def test_the_gateway_sends_no_session_ticket(cert: tuple[Path, Path, Path]) -> None:
    ctx = tls.server_context(cert[0], cert[1])
    assert ctx.num_tickets == 0
    assert not session_after_a_round_trip(ctx, cert[2]).has_ticket


def test_the_check_sees_a_ticket_where_one_is_sent(cert: tuple[Path, Path, Path]) -> None:
    """The probe above is not blind: OpenSSL's default sends tickets, and it sees them."""
    ctx = tls.server_context(cert[0], cert[1])
    ctx.num_tickets = 2
    assert session_after_a_round_trip(ctx, cert[2]).has_ticket
