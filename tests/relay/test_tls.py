"""The RFC 9266 channel binding: right on a real TLS 1.3 connection, closed on anything else."""

from __future__ import annotations

import ctypes
import datetime as dt
import ssl
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay import tls
from relay.errors import TLSBindingError


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


def _handshake(cert: tuple[Path, Path]) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A TLS 1.3 handshake between two in-memory ends (no sockets)."""
    server_ctx = tls.server_context(*cert)
    client_ctx = tls.client_context(cert[0])
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
            return client, server
    raise AssertionError("handshake did not finish")


def test_both_ends_agree_on_the_binding(cert: tuple[Path, Path]) -> None:
    client, server = _handshake(cert)
    binding = tls.channel_binding(client)
    assert len(binding) == tls.EXPORTER_LENGTH
    assert binding == tls.channel_binding(server)
    other, _ = _handshake(cert)
    assert tls.channel_binding(other) != binding


def test_not_an_ssl_object_fails_closed() -> None:
    class Fake:
        context = ssl.create_default_context()
        _sslobj = object()

    with pytest.raises(TLSBindingError):
        tls.channel_binding(Fake())  # type: ignore[arg-type]
    with pytest.raises(TLSBindingError):
        tls.channel_binding(object())  # type: ignore[arg-type]


def test_changed_layout_fails_closed_before_following_a_pointer(
    cert: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CPython that moved the fields one pointer on: the check on the context
    object's position refuses before the would-be ``SSL *`` is handed to OpenSSL."""
    client, _ = _handshake(cert)
    step = ctypes.sizeof(ctypes.c_void_p)
    monkeypatch.setattr(tls, "_SSL_OFFSET", tls._SSL_OFFSET + step)
    monkeypatch.setattr(tls, "_SOCKET_CONTEXT_OFFSET", tls._SOCKET_CONTEXT_OFFSET + step)
    with pytest.raises(TLSBindingError, match="layout"):
        tls.channel_binding(client)
    monkeypatch.setattr(tls, "_SOCKET_CONTEXT_OFFSET", 1 << 20)  # past the object's end
    with pytest.raises(TLSBindingError, match="layout"):
        tls.channel_binding(client)


def test_bogus_pointer_in_place_of_the_ssl_object_does_not_crash() -> None:
    """An object whose memory holds a non-null, invalid pointer where ``SSL *`` is
    expected used to be followed (a segmentation fault); it must be refused. Run in
    a child so that a regression fails this test instead of killing the run."""
    code = textwrap.dedent(
        """
        import ssl
        from relay import tls
        from relay.errors import TLSBindingError

        class Fake:
            context = ssl.create_default_context()
            _sslobj = 0x0000414141414140 | (1 << 29 * 8)  # digits: a wild pointer

        try:
            tls.channel_binding(Fake())
        except TLSBindingError as exc:
            print("refused:", exc)
        """
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("refused:")
