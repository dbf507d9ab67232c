"""The client side of the ``register`` role: bind a new factor credential with a one-time code.

``gw fido2 register`` dials the gateway and sends ``register`` {user, method, code}.
The gateway checks the code, then sends one ``auth_request`` (for FIDO2, the WebAuthn
creation options bound to *this* TLS connection), the client answers with one
``auth_response`` made by its device, and the gateway replies ``registered`` {method,
credential} once the credential is stored, or ``error``. As in :mod:`relay.client`,
this module never imports ``auth``: the ``answer`` callback makes the response.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from . import message as m
from .client import Gateway

#: ``answer(payload, channel_binding)``: the device's response to the gateway's payload.
Answer = Callable[[dict[str, Any], bytes], Awaitable[dict[str, Any]]]

#: Seconds the person has, once the gateway's challenge arrived, to type a PIN and
#: touch the key; the gateway gives the same step its own (shorter) limit.
ANSWER_TIMEOUT = 300.0


async def register_credential(
    gateway: Gateway, *, user: str, method: str, code: str, answer: Answer
) -> dict[str, Any]:
    """Register a credential; returns what the gateway stored (for display).

    Raises :class:`relay.errors.RemoteError` with the gateway's reason (an unknown,
    used or expired code is ``auth_failed``), and whatever ``answer`` raises.
    """
    link = await gateway.dial(handshake_timeout=30.0)
    try:
        link.send(m.RegisterHello(user=user, method=method, code=code))
        binding = link.channel_binding()
        request = await link.expect(m.AuthRequest)
        assert isinstance(request, m.AuthRequest)
        link.extend_handshake(ANSWER_TIMEOUT)
        payload = await answer(request.payload, binding)
        link.send(m.AuthResponse(request.method, payload))
        done = await link.expect(m.Registered)
        assert isinstance(done, m.Registered)
        return dict(done.credential)
    finally:
        await link.aclose()
