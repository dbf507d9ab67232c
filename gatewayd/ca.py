"""The gateway's own CA: the server certificate and agent certificates.

``gatewayd init`` makes a CA (ECDSA P-256) and a server certificate signed by it.
At enrollment an agent sends a CSR for a key it made itself; the gateway signs it
with the agent id as common name and the clientAuth usage, so the agent proves its
identity with mutual TLS from then on. The gateway remembers the certificate's
SHA-256 fingerprint and accepts the agent only with exactly that certificate.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from relay.errors import GatewayError


class CAError(GatewayError):
    """A certificate could not be made or read."""


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def make_ca(cn: str, days: int = 3650) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = new_key()
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    days: int,
    usage: x509.ObjectIdentifier,
) -> x509.CertificateBuilder:
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    names: list[str],
    days: int = 825,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A server certificate for every DNS name or IP address in ``names``."""
    key = new_key()
    sans: list[x509.GeneralName] = []
    for n in dict.fromkeys(names):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    cert = (
        _leaf(
            ca_key,
            ca_cert,
            _name(names[0]),
            key.public_key(),
            days,
            ExtendedKeyUsageOID.SERVER_AUTH,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def sign_agent_csr(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    csr_pem: str,
    agent: str,
    days: int,
) -> x509.Certificate:
    """Sign an agent's CSR; the subject is set here from the agent id, not taken from the CSR."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except (ValueError, x509.InvalidVersion) as exc:
        raise CAError("the certificate signing request is not valid PEM") from exc
    try:
        signed = csr.is_signature_valid
        public_key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:  # a curve or algorithm we do not know
        raise CAError("agent keys must be ECDSA P-256") from exc
    if not signed:
        raise CAError("the certificate signing request's signature does not verify")
    if (
        not isinstance(public_key, ec.EllipticCurvePublicKey)
        or public_key.curve.name != "secp256r1"
    ):
        raise CAError("agent keys must be ECDSA P-256")
    return _leaf(
        ca_key, ca_cert, _name(agent), public_key, days, ExtendedKeyUsageOID.CLIENT_AUTH
    ).sign(ca_key, hashes.SHA256())


def make_csr(key: ec.EllipticCurvePrivateKey, cn: str) -> str:
    csr = x509.CertificateSigningRequestBuilder().subject_name(_name(cn)).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def fingerprint(der: bytes) -> str:
    """SHA-256 of a DER certificate, hex."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return digest.finalize().hex()


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_ca(cert_file: Path, key_file: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise CAError(f"cannot load the gateway CA ({cert_file}, {key_file}): {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CAError(f"{key_file}: the CA key must be ECDSA")
    return key, cert
