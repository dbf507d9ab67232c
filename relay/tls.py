"""TLS context helpers and the RFC 9266 channel binding.

Every context here is TLS 1.3 only and honours ``SSLKEYLOGFILE`` so that a
capture can be read in Wireshark while debugging.

Python's ``ssl`` module has no public call for ``SSL_export_keying_material``
(RFC 5705 / RFC 8446 section 7.5), which RFC 9266 ``tls-exporter`` channel
binding needs. :func:`channel_binding` reaches it through ctypes, using the very
OpenSSL that the interpreter's ``_ssl`` module is linked to, and checks before
every use that the object it found is the connection it was given (the pointer to
its SSL_CTX must be the context's, the protocol version must be TLS 1.3). Before
it follows any pointer it checks what it can without following one: the objects are
CPython's own ``_ssl`` types, every read stays inside them, and the connection's
context object sits where it must sit next to the ``SSL *``. If those checks ever
fail (a future CPython changes its layout) it raises :class:`TLSBindingError`, and
the login fails closed; it never guesses and never crashes.
"""

from __future__ import annotations

import ctypes
import os
import ssl
import sys
from pathlib import Path
from typing import Any

from .errors import TLSBindingError

#: RFC 9266 section 2: label and length of the tls-exporter channel binding.
EXPORTER_LABEL = b"EXPORTER-Channel-Binding"
EXPORTER_LENGTH = 32
_TLS1_3_VERSION = 0x0304


#: TLS key exchange, hybrid first: X25519MLKEM768 (X25519 + ML-KEM-768, as OpenSSH's
#: mlkem768x25519) where the linked OpenSSL has it (3.5+; it is then OpenSSL's default
#: too), X25519 and P-256 for peers without it. OpenSSL 3.0 has no ML-KEM at all.
TLS_GROUPS = "X25519MLKEM768:X25519:secp256r1"


def hybrid_tls_available() -> bool:
    """True when the OpenSSL that Python's ``ssl`` is linked to offers X25519MLKEM768."""
    return ssl.OPENSSL_VERSION_INFO >= (3, 5)


def _groups(ctx: ssl.SSLContext) -> None:
    """Offer the hybrid group first where both OpenSSL and the ``ssl`` module allow it
    (``SSLContext.set_groups`` is not in every Python; OpenSSL 3.5+ puts it first anyway)."""
    set_groups = getattr(ctx, "set_groups", None)
    if set_groups is not None and hybrid_tls_available():
        set_groups(TLS_GROUPS)


def _keylog(ctx: ssl.SSLContext) -> None:
    path = os.environ.get("SSLKEYLOGFILE")
    if path:
        ctx.keylog_filename = path


def server_context(
    cert_file: Path, key_file: Path, client_ca_file: Path | None = None
) -> ssl.SSLContext:
    """The gateway's context: TLS 1.3 only; asks for (but does not require) a client
    certificate signed by ``client_ca_file`` (agents have one, people do not).

    No session tickets: no client of the gateway resumes a TLS session (a session's
    further connections are new handshakes or the agent's spare), and the two tickets
    OpenSSL sends by default after every handshake cost the gateway 40 % of a
    mutual-TLS handshake's processor time (measured: 3.9 ms with, 2.2 without), which
    is what bounds how fast ten thousand agents come back after a restart."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.num_tickets = 0
    ctx.load_cert_chain(cert_file, key_file)
    if client_ca_file is not None:
        ctx.load_verify_locations(cafile=client_ca_file)
        ctx.verify_mode = ssl.CERT_OPTIONAL
    _groups(ctx)
    _keylog(ctx)
    return ctx


def client_context(
    ca_file: Path, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """A context for ``gw`` and agents: TLS 1.3 only, verifies the gateway against
    ``ca_file`` and its host name; presents a certificate when one is given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=ca_file)
    if cert_file is not None:
        ctx.load_cert_chain(cert_file, key_file)
    _groups(ctx)
    _keylog(ctx)
    return ctx


def _libssl_candidates(ssl_module_file: str, base_prefix: str, platform: str) -> list[Path]:
    """Where the libssl that ``_ssl`` links to is, in the order to try.

    On Linux (and macOS) the ``_ssl`` module's own handle resolves the libssl symbols
    it links to, so that comes first. Windows resolves a symbol only in the DLL that
    exports it: python.org's builds ship ``libssl-3.dll`` (``-x64`` in some builds)
    next to ``_ssl.pyd``, in the installation's ``DLLs`` folder. python.org's macOS
    builds keep ``libssl.3.dylib`` in the framework's ``lib`` folder. Only files in
    the interpreter's own folders are tried, never a search path: the library must
    be the one ``_ssl`` really uses.
    """
    here = Path(ssl_module_file).parent
    if platform == "win32":
        names = ["libssl-3-x64.dll", "libssl-3.dll"]
        folders = [here, Path(base_prefix) / "DLLs", Path(base_prefix)]
        return [folder / name for folder in folders for name in names]
    found = [Path(ssl_module_file)]
    if platform == "darwin":
        found += [here.parent / "libssl.3.dylib", Path(base_prefix) / "lib" / "libssl.3.dylib"]
    return found


def _load_libssl() -> ctypes.CDLL:
    """The loaded libssl that exports SSL_export_keying_material, or TLSBindingError."""
    import _ssl  # the C module; its handle resolves libssl symbols it links to

    tried = []
    for path in _libssl_candidates(_ssl.__file__, sys.base_prefix, sys.platform):
        if path != Path(_ssl.__file__) and not path.is_file():
            continue
        tried.append(path.name)
        try:
            lib = ctypes.CDLL(str(path))
            lib.SSL_export_keying_material  # noqa: B018 - a missing symbol raises here
        except (OSError, AttributeError):
            continue
        return lib
    raise TLSBindingError(
        "TLS exporter unavailable: this Python's OpenSSL exports no "
        f"SSL_export_keying_material (tried {', '.join(tried) or 'nothing'}); "
        "channel-bound logins cannot work with this Python build"
    )


class _OpenSSL:
    """The few libssl entry points we need, from the library ``_ssl`` uses."""

    def __init__(self) -> None:
        lib = _load_libssl()
        self.export = lib.SSL_export_keying_material
        self.export.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_int,
        ]
        self.export.restype = ctypes.c_int
        self.version = lib.SSL_version
        self.version.argtypes = [ctypes.c_void_p]
        self.version.restype = ctypes.c_int
        self.get_ctx = lib.SSL_get_SSL_CTX
        self.get_ctx.argtypes = [ctypes.c_void_p]
        self.get_ctx.restype = ctypes.c_void_p


_openssl: _OpenSSL | None = None

# CPython's PySSLSocket and PySSLContext start with PyObject_HEAD (two pointers);
# PySSLSocket then holds a pointer to its socket, ``SSL *ssl`` and ``PySSLContext
# *ctx`` (Modules/_ssl.c); PySSLContext holds ``SSL_CTX *ctx`` right after the head.
_PTR = ctypes.sizeof(ctypes.c_void_p)
_SSL_OFFSET = 3 * _PTR
_SOCKET_CONTEXT_OFFSET = 4 * _PTR
_CTX_OFFSET = 2 * _PTR


def _read_pointer(obj: object, offset: int) -> int:
    """The pointer stored ``offset`` bytes into ``obj``'s own memory (0 for NULL).

    Reads only inside the object (its type's ``__basicsize__``); never follows the
    pointer it returns.
    """
    if offset + _PTR > type(obj).__basicsize__:
        raise TLSBindingError("TLS exporter unavailable: unexpected ssl object layout")
    return ctypes.c_void_p.from_address(id(obj) + offset).value or 0


def _ssl_pointers(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> tuple[int, int]:
    """``SSL *`` and ``SSL_CTX *`` of this connection, or TLSBindingError.

    Every check comes before any foreign pointer is followed: the objects must be
    the C types we know, the reads stay inside them, and the connection's context
    pointer must sit exactly where the ``SSL *`` is expected to sit next to it. Only
    then does OpenSSL confirm that the ``SSL *`` belongs to that context.
    """
    import _ssl

    socket_type = getattr(_ssl, "_SSLSocket", None)
    inner: Any = getattr(ssl_object, "_sslobj", None)
    if socket_type is None or type(inner) is not socket_type:
        raise TLSBindingError("TLS exporter unavailable: not a connected ssl object")
    context = inner.context
    if not isinstance(context, _ssl._SSLContext):
        raise TLSBindingError("TLS exporter unavailable: unexpected ssl context")
    if _read_pointer(inner, _SOCKET_CONTEXT_OFFSET) != id(context):
        raise TLSBindingError("TLS exporter unavailable: unexpected ssl object layout")
    ssl_ptr = _read_pointer(inner, _SSL_OFFSET)
    ctx_ptr = _read_pointer(context, _CTX_OFFSET)
    if not ssl_ptr or not ctx_ptr:
        raise TLSBindingError("TLS exporter unavailable: unexpected ssl object layout")
    return ssl_ptr, ctx_ptr


def channel_binding(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> bytes:
    """RFC 9266 ``tls-exporter`` for this connection (32 bytes)."""
    global _openssl
    ssl_ptr, ctx_ptr = _ssl_pointers(ssl_object)
    try:
        if _openssl is None:
            _openssl = _OpenSSL()
    except (AttributeError, OSError, ImportError) as exc:
        raise TLSBindingError(f"TLS exporter unavailable: {exc}") from exc
    if _openssl.get_ctx(ssl_ptr) != ctx_ptr:
        raise TLSBindingError("TLS exporter unavailable: unexpected ssl object layout")
    if _openssl.version(ssl_ptr) != _TLS1_3_VERSION:
        raise TLSBindingError("channel binding needs TLS 1.3")
    out = ctypes.create_string_buffer(EXPORTER_LENGTH)
    ok = _openssl.export(
        ssl_ptr, out, EXPORTER_LENGTH, EXPORTER_LABEL, len(EXPORTER_LABEL), b"", 0, 1
    )
    if ok != 1:
        raise TLSBindingError("SSL_export_keying_material failed")
    return out.raw
