"""The TLS legs to the gateway and the hybrid key exchange X25519MLKEM768.

Python's ``ssl`` can only offer what the OpenSSL it is linked to has: X25519MLKEM768
arrived in OpenSSL 3.5 (where it is the default first choice); OpenSSL 3.0 has no
ML-KEM. Where it is there, a handshake between our own contexts must use it.
"""

from __future__ import annotations

import ctypes
import ssl
from pathlib import Path

import pytest
from test_tls import _handshake, cert  # noqa: F401 - the fixture is used by name

from relay import tls

NEEDS_OPENSSL_35 = pytest.mark.skipif(
    not tls.hybrid_tls_available(),
    reason=f"Python's ssl is linked to {ssl.OPENSSL_VERSION}, which cannot offer "
    "X25519MLKEM768 (OpenSSL 3.5 or later can)",
)


def _group_name(obj: ssl.SSLObject) -> str:
    """The negotiated key-exchange group, from OpenSSL (SSL_get0_group_name, 3.2+)."""
    lib = tls._load_libssl()
    get_name = lib.SSL_get0_group_name
    get_name.argtypes = [ctypes.c_void_p]
    get_name.restype = ctypes.c_char_p
    ssl_ptr, _ = tls._ssl_pointers(obj)
    name = get_name(ssl_ptr)
    return name.decode() if name else ""


@NEEDS_OPENSSL_35
def test_gateway_and_client_agree_on_x25519mlkem768(cert: tuple[Path, Path]) -> None:  # noqa: F811
    client, server = _handshake(cert)
    assert _group_name(client) == _group_name(server) == "X25519MLKEM768"


def test_contexts_work_whatever_the_openssl(cert: tuple[Path, Path]) -> None:  # noqa: F811
    # On OpenSSL 3.0 the groups are left to OpenSSL (X25519 first); the TLS 1.3
    # handshake and its channel binding are unchanged.
    client, server = _handshake(cert)
    assert client.version() == server.version() == "TLSv1.3"
    assert tls.channel_binding(client) == tls.channel_binding(server)
    assert tls.hybrid_tls_available() == (ssl.OPENSSL_VERSION_INFO >= (3, 5))
