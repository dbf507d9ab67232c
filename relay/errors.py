"""The project's one error tree.

::

    GatewayError                    every error this project raises on purpose
    ├── ProtocolError               the peer broke the wire protocol (remote)
    │   ├── FrameTooLarge
    │   └── UnsupportedVersion
    ├── HandshakeTimeout            the peer went silent during a handshake
    ├── NoiseError                  the end-to-end handshake or a record failed
    ├── TunnelCut                   a tunnel ended without its end-to-end end of stream
    ├── TLSBindingError             the TLS channel binding could not be read
    ├── AuthError                   auth/: a factor could not be proved or checked
    │   └── DeviceError             the local authenticator (security key, card reader) is
    │                               missing, unusable or locked: a local problem, not a refusal
    ├── ConfigError                 gatewayd/: config with the key path at fault
    ├── PolicyDenied                gatewayd/: the directory does not allow it
    └── RemoteError                 the other side sent an error frame

Errors are split the way h11 splits them: *local* errors (the caller misused an
API) raise at once; *remote* errors (the peer misbehaved) become an error frame and
a close, never an exception out of ``receive_data()``.
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    """Base of every error raised on purpose by gatewayd, gw and the agent."""


class ProtocolError(GatewayError):
    """The peer sent bytes that break the wire protocol."""

    code = "protocol_error"


class FrameTooLarge(ProtocolError):
    """A frame announced a length above the limit."""

    code = "frame_too_large"


class UnsupportedVersion(ProtocolError):
    """The peer speaks a protocol version this side does not."""

    code = "unsupported_version"


class HandshakeTimeout(GatewayError):
    """The peer did not finish its handshake in time."""

    code = "timeout"


class NoiseError(GatewayError):
    """The Noise handshake or a transport message failed to verify."""


class TunnelCut(GatewayError):
    """A tunnel ended without the peer's end-of-stream record: what came is incomplete."""


class TLSBindingError(GatewayError):
    """The TLS exporter (RFC 9266) could not be read from this connection."""


class AuthError(GatewayError):
    """A factor could not be proved (client side) or checked (gateway side).

    ``payload``: on the client side, a prover that gives up *after* it learnt something
    the gateway should audit (the smartcard's certificate, a wrong PIN) sets it to the
    ``auth_response`` payload that says so; :func:`relay.client.open_session` sends it
    before it reports the error. None: nothing is sent, the connection just closes.
    """

    def __init__(self, message: str = "", *, payload: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.payload = payload


class DeviceError(AuthError):
    """The device a prover needs is missing, unusable or locked, or its library is not installed.

    ``gw`` reports it as a local problem (exit code 4) rather than a failed login: no
    security key plugged in, a key whose PIN is blocked, python-fido2 not installed.
    """


class ConfigError(GatewayError):
    """Configuration is invalid; the message names the key path at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


class PolicyDenied(GatewayError):
    """The directory does not allow the request; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RemoteError(GatewayError):
    """The peer sent an error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})" if message else code)
        self.code = code
        self.message = message
