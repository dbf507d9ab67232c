"""A real OCSP responder on loopback for the tests (RFC 6960 over HTTP POST).

It answers for the CAs of tests/support/pki.py with responses built by cryptography's
OCSPResponseBuilder, signed by the CA itself or by a delegated responder certificate.
``behaviour`` makes it misbehave the ways the verifier must refuse: ``wrong key``
(signed by an unrelated key), ``stale`` (nextUpdate passed), ``other certificate`` (a
response for another serial), ``future`` (thisUpdate a day ahead), ``no echo`` (drops
the request's nonce), ``try later`` (an unsuccessful status), ``garbage`` (not DER),
``http 500``, ``redirect``, ``silent`` (no answer until :attr:`release` is
set). Every request is counted in :attr:`OcspResponder.requests`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pki
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

__all__ = ["OcspResponder", "delegated_responder", "running"]

HOUR = dt.timedelta(hours=1)


def delegated_responder(ca: pki.CA, *, ocsp_signing: bool = True) -> pki.CA:
    """A responder certificate issued by ``ca`` (with the OCSPSigning usage by default)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    usages = [ExtendedKeyUsageOID.OCSP_SIGNING if ocsp_signing else ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = (
        x509.CertificateBuilder()
        .subject_name(pki._ca_name("OCSP Responder"))
        .issuer_name(ca.name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - HOUR)
        .not_valid_after(now + 30 * 24 * HOUR)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return pki.CA(key, cert)


class OcspResponder:
    """Answers for the certificates of ``cas``: revoked if the CA revoked them,
    unknown if their serial is in :attr:`unknown`, good otherwise."""

    def __init__(self, cas: list[pki.CA]) -> None:
        self.cas = {ca.name.public_bytes(): ca for ca in cas}
        self.behaviour = "normal"
        self.signer: pki.CA | None = None  # a delegated responder, else the CA signs
        self.unknown: set[int] = set()
        self.requests = 0
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/ocsp"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _find(self, request: ocsp.OCSPRequest) -> pki.CA:
        for ca in self.cas.values():
            if _key_hash(ca, request.hash_algorithm) == request.issuer_key_hash:
                return ca
        raise LookupError("no such CA")

    def answer(self, body: bytes) -> tuple[int, bytes]:
        with self._lock:
            self.requests += 1
            behaviour = self.behaviour
        if behaviour == "http 500":
            return 500, b"down"
        if behaviour == "redirect":
            return 302, b""
        if behaviour == "silent":  # answers only once released (or after a minute)
            self.release.wait(60)
            return 500, b"late"
        if behaviour == "garbage":
            return 200, b"\x30\x03\x0a\x01"
        if behaviour == "try later":
            return 200, _der(ocsp.OCSPResponseBuilder.build_unsuccessful(
                ocsp.OCSPResponseStatus.TRY_LATER))  # fmt: skip
        request = ocsp.load_der_ocsp_request(body)
        ca = self._find(request)
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        this_update, next_update = now - HOUR, now + HOUR
        if behaviour == "stale":
            this_update, next_update = now - 3 * HOUR, now - HOUR
        elif behaviour == "future":
            this_update, next_update = now + 24 * HOUR, now + 48 * HOUR
        serial = request.serial_number
        if behaviour == "other certificate":
            serial += 1
        status, revoked_at = ocsp.OCSPCertStatus.GOOD, None
        if serial in ca.revoked:
            status, revoked_at = ocsp.OCSPCertStatus.REVOKED, ca.revoked[serial]
        elif serial in self.unknown:
            status = ocsp.OCSPCertStatus.UNKNOWN
        builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
            request.issuer_name_hash,
            request.issuer_key_hash,
            serial,
            request.hash_algorithm,
            status,
            this_update,
            next_update,
            revoked_at,
            x509.ReasonFlags.key_compromise if revoked_at else None,
        )
        signer = self.signer or ca
        if behaviour == "wrong key":
            # A key of its own under the CA's name: the ID names the CA, the key is not its.
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            impostor = (
                x509.CertificateBuilder()
                .subject_name(ca.name)
                .issuer_name(ca.name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - HOUR)
                .not_valid_after(now + HOUR)
                .sign(key, hashes.SHA256())
            )
            signer = pki.CA(key, impostor)
            builder = builder.responder_id(ocsp.OCSPResponderEncoding.NAME, impostor)
        else:
            builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, signer.cert)
        if self.signer is not None:
            builder = builder.certificates([self.signer.cert])
        if behaviour != "no echo":
            for ext in request.extensions:
                if isinstance(ext.value, x509.OCSPNonce):
                    builder = builder.add_extension(ext.value, critical=False)
        return 200, _der(builder.sign(signer.key, hashes.SHA256()))

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        responder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                code, data = responder.answer(self.rfile.read(length))
                self.send_response(code)
                if code == 302:  # to where the answer would be good, were it followed
                    self.send_header("Location", responder.url)
                self.send_header("Content-Type", "application/ocsp-response")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                # A "silent" answer comes after the client gave up: its socket is gone.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def _key_hash(ca: pki.CA, algorithm: hashes.HashAlgorithm) -> bytes:
    request = ocsp.OCSPRequestBuilder().add_certificate(ca.cert, ca.cert, algorithm).build()
    return request.issuer_key_hash


def _der(response: ocsp.OCSPResponse) -> bytes:
    return response.public_bytes(serialization.Encoding.DER)


@contextmanager
def running(cas: list[pki.CA]) -> Iterator[OcspResponder]:
    responder = OcspResponder(cas)
    responder.start()
    try:
        yield responder
    finally:
        responder.stop()
