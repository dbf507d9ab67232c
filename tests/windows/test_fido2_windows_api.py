"""FIDO2 on Windows: without administrator rights gw goes through Windows' WebAuthn API
(python-fido2's WindowsClient). That API is not under Wine; here a stand-in with
WindowsClient's interface drives the software authenticator through python-fido2's
client, so the path gw takes on Windows (its options, the client data bound to the TLS
channel, the gateway's checks) runs for real up to the DLL call."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from fido2.client import DefaultClientDataCollector, Fido2Client, UserInteraction
from soft_authenticator import SoftAuthenticator

import auth.fido2 as f2
from auth.base import AuthContext, ProverOptions
from relay.errors import AuthError

RP = "gateway.example.org"
SETTINGS: dict[str, Any] = {"rp_id": RP, "rp_name": "Test gateway"}


PIN = "246810"


class Dialog(UserInteraction):
    """Windows' own dialog asks the PIN (gw's prompt is never used on this path)."""

    def request_pin(self, permissions: Any, rp_id: str | None) -> str | None:
        return PIN

    def request_uv(self, permissions: Any, rp_id: str | None) -> bool:
        return True


class StandInWindowsClient:
    """WindowsClient's interface over a key: the dialog's PIN and touch are the key's."""

    origins: list[str] = []

    def __init__(self, device: SoftAuthenticator, origin: str) -> None:
        self.origins.append(origin)
        self._client = Fido2Client(device, DefaultClientDataCollector(origin), Dialog())

    def get_assertion(self, options: Any, event: Any = None) -> Any:
        return self._client.get_assertion(options, event)

    def make_credential(self, options: Any, event: Any = None) -> Any:
        return self._client.make_credential(options, event)


@pytest.fixture
def windows(monkeypatch: pytest.MonkeyPatch) -> SoftAuthenticator:
    device = SoftAuthenticator(pin=PIN)
    StandInWindowsClient.origins = []
    monkeypatch.setattr(f2, "windows_webauthn", lambda: True)
    monkeypatch.setattr(f2, "_windows_client", lambda o: StandInWindowsClient(device, o))
    return device


def _context(record: Any, binding: bytes) -> AuthContext:
    return AuthContext(
        user="alice",
        channel_binding=binding,
        now=2000.0,
        source="192.0.2.7",
        credential=record,
        settings=SETTINGS,
    )


def _register(binding: bytes, prover_binding: bytes | None = None) -> dict[str, Any]:
    payload, state = f2.registration_begin(
        RP, "Test gateway", b"user-0001", "alice", None, binding, "preferred"
    )
    response = asyncio.run(f2.register(None, payload, prover_binding or binding, lambda t, s: ""))
    record, _ = f2.registration_complete(state, response, None, now=1000.0)
    return record


def _login(record: Any, binding: bytes, prover_binding: bytes) -> Any:
    verifier = f2.FACTOR.verifier()
    ctx = _context(record, binding)
    challenge = verifier.begin(ctx)
    prover = f2.FACTOR.prover(ProverOptions(user="alice", prompt=lambda t, s: "", values={}))
    response = asyncio.run(prover.respond(challenge.payload, prover_binding))
    return verifier.complete(ctx, challenge.state, response)


def test_register_and_log_in_through_the_windows_api(windows: SoftAuthenticator) -> None:
    record = _register(os.urandom(32))
    binding = os.urandom(32)
    outcome = _login(record, binding, binding)
    assert outcome.ok, outcome
    assert StandInWindowsClient.origins == [f"https://{RP}", f"https://{RP}"]


def test_the_windows_api_path_stays_bound_to_the_tls_channel(
    windows: SoftAuthenticator,
) -> None:
    """An assertion made for another TLS connection (a relaying man in the middle) fails."""
    record = _register(os.urandom(32))
    outcome = _login(record, os.urandom(32), os.urandom(32))
    assert not outcome.ok and "bound to another TLS channel" in outcome.reason
    with pytest.raises(AuthError, match="bound to another TLS channel"):
        _register(os.urandom(32), prover_binding=os.urandom(32))


def test_a_named_device_is_used_directly_even_on_windows(
    windows: SoftAuthenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--fido2-device (an administrator's USB access, or a test key) skips the Windows API."""
    record = _register(os.urandom(32))
    binding = os.urandom(32)
    verifier = f2.FACTOR.verifier()
    ctx = _context(record, binding)
    challenge = verifier.begin(ctx)
    prover = f2.FACTOR.prover(
        ProverOptions(user="alice", prompt=lambda t, s: PIN, values={"fido2_device": windows})
    )
    before = len(StandInWindowsClient.origins)
    response = asyncio.run(prover.respond(challenge.payload, binding))
    assert verifier.complete(ctx, challenge.state, response).ok
    assert len(StandInWindowsClient.origins) == before
