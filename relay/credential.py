"""Login credentials (``gw login``): the proof that a client holds a credential's key.

``gw login`` proves the mode's factors once and makes a new Ed25519 key; the gateway
keeps only its public key and the credential's id. Each later ``gw connect`` proves
possession: the gateway sends a fresh nonce, the client signs::

    "gw-login-v1\\0" || credential id || "\\0" || nonce || tls-exporter

with the RFC 9266 ``tls-exporter`` value of its own TLS connection, so a proof seen
once (or taken from a log) is worth nothing on any other connection.
"""

from __future__ import annotations

import base64

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

#: The ``auth_request`` method of the possession proof.
METHOD = "credential"
LABEL = b"gw-login-v1\0"
#: Bytes of the gateway's nonce.
NONCE_LEN = 32


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    """base64url without padding; ValueError if it is not."""
    if not isinstance(text, str) or len(text) > 256:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def signed_text(credential: str, nonce: bytes, binding: bytes) -> bytes:
    """What the client signs: bound to the credential, the nonce and the TLS channel."""
    return LABEL + credential.encode() + b"\0" + nonce + binding


def new_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_text(key: Ed25519PrivateKey) -> str:
    """The key's public half as the hello's ``login_key`` carries it."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return b64(raw)


def private_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def load_private(raw: bytes) -> Ed25519PrivateKey:
    """The key from its 32 raw bytes; ValueError otherwise."""
    if len(raw) != 32:
        raise ValueError("not a 32-byte Ed25519 key")
    return Ed25519PrivateKey.from_private_bytes(raw)


def prove(
    key: Ed25519PrivateKey, credential: str, payload: dict[str, object], binding: bytes
) -> dict[str, str]:
    """The client's ``auth_response`` payload for the gateway's ``credential`` request."""
    nonce = unb64(str(payload.get("nonce", "")))
    if len(nonce) != NONCE_LEN or payload.get("credential") != credential:
        raise ValueError("the gateway's credential challenge is malformed")
    return {"signature": b64(key.sign(signed_text(credential, nonce, binding)))}


def check_public(text: str) -> bytes:
    """The 32 raw bytes of a ``login_key``; ValueError if it is not an Ed25519 key."""
    raw = unb64(text)
    Ed25519PublicKey.from_public_bytes(raw)  # ValueError unless 32 bytes
    return raw


def verify(
    public: bytes, credential: str, nonce: bytes, binding: bytes, payload: dict[str, object]
) -> bool:
    """True when ``payload`` signs this credential, nonce and channel with ``public``."""
    try:
        signature = unb64(str(payload.get("signature", "")))
        Ed25519PublicKey.from_public_bytes(public).verify(
            signature, signed_text(credential, nonce, binding)
        )
    except (ValueError, InvalidSignature):
        return False
    return True
