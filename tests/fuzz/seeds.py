"""Write the fuzzers' fixtures and seed corpus from valid inputs the test helpers make.

    .venv/bin/python tests/fuzz/seeds.py            # fixtures (if missing) and seeds
    .venv/bin/python tests/fuzz/seeds.py --fixtures # new keys, certificates, records

The fixtures (``tests/fuzz/fixtures``) are the fixed keys, certificates, CRLs and
credential records the harnesses check against; the seeds (``corpus/<target>/seed-*``)
are valid inputs made against them: real wire frames, a real Noise handshake and
records, the software FIDO2 authenticator's responses, the virtual PIV card's
answers, the test PKI's certificates and CRLs, the example config and admin
requests as ``gw admin`` sends them. New fixtures invalidate the kept corpus's
meaning (not its use), so they are made once and kept.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(HERE.parent / "support"), str(ROOT)]

import fuzz_targets as ft  # noqa: E402

#: A fixed point in time inside every fixture's validity (certificates, CRLs).
NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)


def write_seeds(name: str, seeds: list[bytes]) -> None:
    folder = ft.CORPUS / name
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("seed-*"):
        old.unlink()
    for i, seed in enumerate(seeds):
        (folder / f"seed-{i:02d}").write_bytes(seed)


# -- fixtures -----------------------------------------------------------------------------


def make_fido2_fixture() -> None:
    from cryptography.hazmat.primitives import serialization
    from soft_authenticator import SoftAuthenticator

    import auth.fido2 as f2
    from auth.base import ProverOptions

    rp, binding = "gateway.example.org", hashlib.sha256(b"fuzz binding").digest()
    device = SoftAuthenticator()
    payload, reg_state = f2.registration_begin(rp, "gw", b"user-0001", "alice", None, binding)
    reg_response = asyncio.run(f2.register(device, payload, binding, lambda t, s: ""))
    record, _ = f2.registration_complete(reg_state, reg_response, None, now=1000.0)
    (key,) = [c.key for c in device.credentials.values()]
    settings = {"rp_id": rp, "rp_name": "gw"}
    ctx = ft._fido2_ctx({"binding": binding, "now": 2000.0, "record": record, "settings": settings})
    challenge = f2.Fido2Verifier().begin(ctx)
    prover = f2.FACTOR.prover(
        ProverOptions(user="alice", prompt=lambda t, s: "", values={"fido2_device": device})
    )
    login = asyncio.run(prover.respond(challenge.payload, binding))
    fixture = {
        "binding": binding.hex(),
        "now": 2000.0,
        "settings": settings,
        "record": record,
        "state": challenge.state,
        "reg_state": reg_state,
        "private_key": key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
        "login_response": login,
        "registration_response": reg_response,
    }
    (ft.FIXTURES / "fido2.json").write_text(json.dumps(fixture, indent=1) + "\n")


def make_smartcard_fixture() -> None:
    import pki
    from cryptography.hazmat.primitives import serialization

    from auth import smartcard as sc

    work = ft._scratch() / "pki"
    shutil.rmtree(work, ignore_errors=True)
    card_pki = pki.CardPKI(work, now=NOW)
    card = card_pki.card(1, "ec")
    card_pki.revoke(card_pki.person(2, "ec"))  # a CRL with an entry
    settings = card_pki.settings()
    out = ft.FIXTURES / "smartcard"
    out.mkdir(parents=True, exist_ok=True)
    for name in ("root.pem", "intermediate.pem", "intermediate.crl", "root.crl.pem"):
        shutil.copy(card_pki.files / name, out / name)
    binding = hashlib.sha256(b"fuzz smartcard binding").digest()
    nonce = hashlib.sha256(b"fuzz smartcard nonce").digest()
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    signature = card.auth.key.sign(sc.to_be_signed(nonce, binding), ec.ECDSA(hashes.SHA256()))
    meta = {
        "now": NOW.timestamp(),
        "binding": binding.hex(),
        "nonce": ft.b64e(nonce),
        "cert_serial": card.person,
        "good_response": {
            "certificate": ft.b64e(card.auth.der),
            "chain": [],
            "algorithm": sc.ALG_ECDSA_P256_SHA256,
            "signature": ft.b64e(signature),
        },
        "intermediate": ft.b64e(
            card_pki.intermediate.cert.public_bytes(serialization.Encoding.DER)
        ),
        "auth_key": card.auth.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
        "sign_cert": ft.b64e(card.sign.der),
    }
    del settings
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


# -- seeds --------------------------------------------------------------------------------


def wire_seeds() -> list[bytes]:
    from relay import message as m
    from relay import protocol as p

    key = ft.b64e(bytes(32))

    def frames(*msgs: m.Message) -> bytes:
        conn = p.Connection(p.Side.ACCEPTOR, now=0.0)
        out = b""
        for msg in msgs:
            conn._queue(msg)
            out += conn.data_to_send()
        return out

    hellos = ft._hellos()
    to_gateway = {
        "client": m.ClientHello("alice", "agent-1", "ssh", "access", key, "INC-1", ("totp",)),
        "agent": m.AgentHello(("ssh",)),
        "enroll": m.EnrollRequest("tok", "-----BEGIN CERTIFICATE REQUEST-----", key),
        "tunnel": m.TunnelHello("ticket"),
        "register": m.RegisterHello("alice", "fido2", "123456"),
    }
    seeds = []
    for hello in to_gateway.values():
        seeds.append(b"\x00\x04" + p.PREAMBLE + frames(hello, m.Ping(1)))
    seeds.append(
        b"\x00\x10"
        + p.PREAMBLE
        + frames(
            to_gateway["client"],
            m.AuthResponse("totp", {"code": "123456"}),
            m.Bye("user quit"),
        )
    )
    seeds.append(
        b"\x00\x00"
        + p.PREAMBLE
        + frames(to_gateway["agent"], m.ApprovalAnswer("r1", True, "bob"), m.DialFailed("t", "x"))
    )
    # The gateway's answers, fed to gw and the agent in each of their states.
    session = m.SessionOpened("s1", "tk", "agent-1", "ssh", key, 1e9, False)
    answers = {
        1: [
            m.AuthRequest("totp", {}),
            m.ApprovalPending("r1", "s1", key, 60.0),
            session,
            m.Ping(3),
            m.Error("auth_failed", "no"),
        ],
        2: [
            m.Dial("tok", "ssh", "s1", key, "alice", "access"),
            m.Approve("r1", "s1", "alice", "acme", "Acme", "support", "ssh", "why", key, 60.0),
            m.Notice("started", "s1", "alice", "Acme", "support", "ssh"),
        ],
        3: [m.Spliced()],
        5: [m.Enrolled("agent-1", "-----BEGIN CERTIFICATE-----")],
        6: [m.AuthRequest("fido2", {"nonce": "x"}), m.Registered("fido2", {"id": "abc"})],
    }
    for role, msgs in answers.items():
        assert hellos[role] is not None
        seeds.append(bytes([role, 7]) + frames(*msgs) + b"raw bytes after the splice")
    seeds.append(bytes([1, 0]) + frames(m.AgentList({"agent-1": {"online": True}})))
    return seeds


def message_seeds() -> list[bytes]:
    from relay import message as m

    key = ft.b64e(bytes(32))
    msgs: list[m.Message] = [
        m.ClientHello("alice", "agent-1", "ssh", "support", key, "INC-1", ("totp", "fido2")),
        m.AgentHello(("ssh", "web")),
        m.SessionOpened("s1", "tk", "agent-1", "ssh", key, 1e9, False),
        m.Approve("r1", "s1", "alice", "acme", "Acme", "support", "ssh", "why", key, 60.0),
        m.ApprovalAnswer("r1", False, "bob", "busy"),
        m.Error("denied", "no", {"retry": 1}),
        m.Ping(7),
        m.AgentList({"agent-1": {"modes": ["access"], "online": True, "targets": ["ssh"]}}),
        m.RegisterHello("alice", "fido2", "code"),
    ]
    return [json.dumps(msg.to_json()).encode() for msg in msgs]


def noise_seeds() -> tuple[list[bytes], list[bytes]]:
    from relay import noise

    responder_static = ft.fixed_key("responder-static")
    initiator = noise.HandshakeState.initiator(
        ft.fixed_key("initiator-static"),
        noise.public_key(responder_static),
        ft.PROLOGUE,
        ephemeral_private=ft.fixed_key("initiator-ephemeral"),
    )
    responder = noise.HandshakeState.responder(
        responder_static, ft.PROLOGUE, ephemeral_private=ft.fixed_key("responder-ephemeral")
    )
    msg1 = initiator.write_message(b"")
    responder.read_message(msg1)
    msg2 = responder.write_message(b"")
    handshake = [b"\x01" + msg1, b"\x00" + msg2]
    frames = [
        b"\xff\xff\x05" + noise.frame(msg1) + noise.frame(msg2) + b"early",
        b"\x00\x40\x01" + noise.frame(msg2)[:40],
    ]
    return handshake, frames


def tunnel_seeds() -> list[bytes]:
    from relay import noise, tunnel

    sealer = tunnel.Sealer(noise.CipherState(ft.TUNNEL_KEY))
    parts, _ = sealer.feed(b"SSH-2.0-OpenSSH_9.6\r\n")
    more, _ = sealer.feed(b"x" * 300)
    end = sealer.end()
    assert end is not None
    stream = noise.NoiseStream(noise.CipherState(ft.TUNNEL_KEY), noise.CipherState(bytes(32)))
    return [
        b"\x05" + b"".join(parts) + b"".join(more) + end,
        b"\x40" + b"".join(parts),
        b"\x00" + stream.encrypt(b"hello"),
    ]


def fido2_seeds() -> dict[str, list[bytes]]:
    from auth.base import b64d

    fx = ft._fixture("fido2.json")
    login, reg = fx["login_response"], fx["registration_response"]
    login_fields = [
        b64d(login[k])
        for k in ("credential_id", "client_data_json", "authenticator_data", "signature")
    ]
    reg_fields = [b64d(reg[k]) for k in ("credential_id", "client_data_json", "attestation_object")]
    return {
        "fido2_login": [b"\x00" + ft.pack(*login_fields), b"\x01" + ft.pack(*login_fields)],
        "fido2_client_data": [login_fields[1], reg_fields[1]],
        "fido2_registration": [ft.pack(*reg_fields)],
    }


class RecordingPort:
    def __init__(self, card: Any) -> None:
        self.card = card
        self.answers: list[tuple[bytes, int]] = []
        self.reader = "recording"

    def transmit(self, apdu: bytes) -> tuple[bytes, int]:
        response = self.card.process(apdu)
        data, sw = response[:-2], int.from_bytes(response[-2:], "big")
        self.answers.append((data, sw))
        return data, sw

    def close(self) -> None:
        pass


def piv_seeds() -> tuple[list[bytes], list[bytes]]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from virtual_piv import VirtualPIV

    from auth import smartcard as sc
    from auth.base import b64d

    fx = ft._fixture("smartcard/meta.json")
    cert = x509.load_der_x509_certificate(b64d(fx["good_response"]["certificate"]))
    key = serialization.load_pem_private_key(fx["auth_key"].encode(), None)
    seeds, tlvs = [], []
    for compress in (False, True):
        vcard = VirtualPIV(cert, key, compress=compress)  # type: ignore[arg-type]
        vcard.power_on()
        port = RecordingPort(vcard)
        card = sc.PivCard(port)
        card.select()
        der = card.read_certificate()
        card.pin_tries_left()
        card.verify_pin("123456")
        sc.sign_with_card(card, x509.load_der_x509_certificate(der), b"fuzz message")
        seeds.append(ft.script(port.answers))
        tlvs.extend(data for data, _ in port.answers if data)
    wrong = VirtualPIV(cert, key)  # wrong PIN, then the card blocks
    wrong.power_on()
    port = RecordingPort(wrong)
    card = sc.PivCard(port)
    card.select()
    card.read_certificate()
    for _ in range(3):
        with contextlib.suppress(sc.AuthError):
            card.verify_pin("654321")
    seeds.append(ft.script(port.answers))
    return seeds, tlvs


def smartcard_seeds() -> tuple[list[bytes], list[bytes]]:
    from auth.base import b64d

    fx = ft._fixture("smartcard/meta.json")
    good = fx["good_response"]
    leaf, sig = b64d(good["certificate"]), b64d(good["signature"])
    inter = b64d(fx["intermediate"])
    responses = [
        b"\x01" + ft.pack(leaf, b"", b"", sig),
        b"\x05" + ft.pack(leaf, inter, b"", sig),
        b"\x13" + ft.pack(leaf, b"", b"", b""),  # declined: wrong pin
        b"\x01" + ft.pack(b64d(fx["sign_cert"]), b"", b"", sig),
    ]
    crls = [
        (ft.FIXTURES / "smartcard" / name).read_bytes()
        for name in ("intermediate.crl", "root.crl.pem")
    ]
    return responses, crls


def csr_seeds() -> list[bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from gatewayd import ca

    seeds = []
    for cn in ("agent-1", "a" * 60):
        pem = ca.make_csr(ca.new_key(), cn)
        csr = x509.load_pem_x509_csr(pem.encode())
        seeds.append(csr.public_bytes(serialization.Encoding.DER))
    return seeds


def config_seeds() -> list[bytes]:
    seeds = [(ROOT / "config.example.toml").read_bytes()]
    from gatewayd import init

    text = init.CONFIG_TEMPLATE.format(listen="127.0.0.1:8443", node="gw1", rp_id="example.org")
    seeds.append(text.encode())
    seeds.append(
        text.encode()
        + b'\n[auth.smartcard]\ntrust_anchors = ["~/ca.pem"]\ncrl_files = ["crl/a.crl"]\n'
    )
    return seeds


def admin_seeds() -> list[bytes]:
    requests: list[tuple[str, dict[str, Any]]] = [
        ("org.add", {"org": "acme", "name": "Acme"}),
        ("vendor.add", {"vendor": "vend", "name": "Vendor"}),
        ("user.add", {"user": "alice", "vendor": "vend", "password": "correct horse"}),
        ("user.add", {"user": "bob", "org": "acme", "cert_serial": "UN:NO-1"}),
        ("user.password", {"user": "alice", "password": "battery staple"}),
        ("totp.enroll", {"user": "alice"}),
        ("agreement.add", {"vendor": "vend", "org": "acme", "modes": ["access"], "id": "ag1"}),
        ("agreement.accept", {"agreement": "ag1", "side": "vendor"}),
        ("agreement.state", {"agreement": "ag1", "state": "suspended"}),
        ("agent.add", {"agent": "host1", "org": "acme", "ttl": 3600}),
        ("grant.add", {"user": "alice", "agent": "host1"}),
        ("fido2.invite", {"user": "alice", "ttl": 600}),
        ("fido2.list", {"user": "alice"}),
        ("fido2.remove", {"user": "alice", "key": "abc"}),
        ("vendor.networks", {"vendor": "vend", "networks": ["192.0.2.0/24", "2001:db8::/48"]}),
        ("show", {"kind": "user", "id": "alice"}),
        ("disable", {"kind": "user", "id": "alice"}),
        ("enable", {"kind": "user", "id": "alice"}),
        ("list", {"what": "users"}),
        ("sessions.list", {}),
        ("sessions.kill", {"session": "s1"}),
        ("status", {}),
        ("remove", {"kind": "agreement", "id": "ag1"}),
    ]
    return [json.dumps({"op": op, "args": args}).encode() + b"\n" for op, args in requests]


def cluster_seeds() -> list[bytes]:
    """A note of each kind on each topic a cluster node reads (first byte: the topic)."""
    dial = {
        "t": "dial",
        "token": "tok",
        "target": "echo",
        "session_id": "s1",
        "client_key": "k",
        "user": "vera",
        "mode": "access",
        "address": "127.0.0.1:9001",
    }
    answer = {"t": "approval", "request": "r", "approved": True, "by": "x", "reason": ""}
    notes = [
        (0, {"kind": "agent", "from": "n1", "agent": "pc1", "msg": dial}),
        (0, {"kind": "ack", "from": "n1", "token": "tok"}),
        (0, {"kind": "answer", "from": "n1", "agent": "pc1", "msg": answer}),
        (1, {"kind": "changed", "from": "n1", "why": "user.disable by root"}),
        (1, {"kind": "kill", "from": "n1", "session": "s1", "reason": "killed", "req": "q"}),
        (2, {"node": "n1", "state": "dead"}),
        (3, {"node": "n1", "targets": ["echo"], "since": 5}),
        (4, {"node": "n2", "targets": ["echo"], "since": 5}),
    ]
    return [bytes([topic]) + json.dumps(note).encode() for topic, note in notes]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", action="store_true", help="make new fixtures")
    args = parser.parse_args()
    ft.FIXTURES.mkdir(exist_ok=True)
    if args.fixtures or not (ft.FIXTURES / "fido2.json").exists():
        make_fido2_fixture()
    if args.fixtures or not (ft.FIXTURES / "smartcard" / "meta.json").exists():
        make_smartcard_fixture()
    write_seeds("wire", wire_seeds())
    write_seeds("message", message_seeds())
    handshake, frames = noise_seeds()
    write_seeds("noise_handshake", handshake)
    write_seeds("noise_frames", frames)
    write_seeds("tunnel_records", tunnel_seeds())
    for name, seeds in fido2_seeds().items():
        write_seeds(name, seeds)
    piv, tlvs = piv_seeds()
    write_seeds("piv_card", piv)
    write_seeds("piv_tlv", tlvs)
    responses, crls = smartcard_seeds()
    write_seeds("smartcard_response", responses)
    write_seeds("smartcard_crl", crls)
    write_seeds("enroll_csr", csr_seeds())
    write_seeds("config", config_seeds())
    write_seeds("admin", admin_seeds())
    write_seeds("cluster_note", cluster_seeds())
    missing = set(ft.TARGETS) - {p.name for p in ft.CORPUS.iterdir()}
    if missing:
        print(f"no seeds for {sorted(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
