"""The gateway's TLS context sends no session tickets (relay/tls.py).

Two tickets after every handshake were 40 % of a mutual-TLS handshake's processor time at
the gateway, and no client of the gateway resumes a session: a crowd of agents coming
back after a restart must not pay for them. In memory, no sockets.
"""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay import tls


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway.test")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("gateway.test")]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


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


def test_the_gateway_sends_no_session_ticket(cert: tuple[Path, Path]) -> None:
    ctx = tls.server_context(*cert)
    assert ctx.num_tickets == 0
    assert not session_after_a_round_trip(ctx, cert[0]).has_ticket


def test_the_check_sees_a_ticket_where_one_is_sent(cert: tuple[Path, Path]) -> None:
    """The probe above is not blind: OpenSSL's default sends tickets, and it sees them."""
    ctx = tls.server_context(*cert)
    ctx.num_tickets = 2
    assert session_after_a_round_trip(ctx, cert[0]).has_ticket
