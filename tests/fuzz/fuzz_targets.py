"""Fuzz harnesses: one function per parser of untrusted input.

Each harness takes one ``bytes`` input, hands it to a parser the way the program
does, and returns normally when the parser produced a result or raised one of the
exceptions it documents. Anything else escapes: an undocumented exception type, or a
:class:`Finding` (a broken promise that is not an exception, such as the admin
socket answering "internal error"). The same functions run under atheris
(``tests/fuzz/run.py``, ``make fuzz``) and under Hypothesis (``test_fuzz_smoke.py``).

Inputs that carry several values (a FIDO2 response, a card's answers) are split
with :func:`fields`: every value but the last is prefixed by its 2-byte length.
The fixed keys, certificates and credential records the harnesses check against
are in ``tests/fuzz/fixtures`` (written by ``seeds.py`` with the seed corpus), so
that a kept corpus input means the same thing on every run.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import functools
import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
CORPUS = HERE / "corpus"

#: A harness returns True when the parser accepted the input (the seeds must be).
Harness = Callable[[bytes], bool]
TARGETS: dict[str, Harness] = {}


class Finding(AssertionError):
    """A parser broke a promise without raising (or raised through a catch-all)."""


def target(fn: Harness) -> Harness:
    TARGETS[fn.__name__] = fn
    return fn


def fields(data: bytes, n: int) -> list[bytes]:
    """Split ``data`` into ``n`` values: n-1 length-prefixed (2 bytes), then the rest."""
    out = []
    pos = 0
    for _ in range(n - 1):
        length = int.from_bytes(data[pos : pos + 2], "big")
        out.append(data[pos + 2 : pos + 2 + length])
        pos = min(len(data), pos + 2 + length)
    out.append(data[pos:])
    return out


def pack(*values: bytes) -> bytes:
    """The inverse of :func:`fields`."""
    *head, last = values
    return b"".join(len(v).to_bytes(2, "big") + v for v in head) + last


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def fixed_key(label: str) -> bytes:
    """A deterministic 32-byte X25519 private key for the Noise harnesses."""
    return hashlib.sha256(b"gw-fuzz-" + label.encode()).digest()


def _fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


# -- the wire: framing, state machine, messages -------------------------------------------


def _hellos() -> list[Any]:
    from relay import message as m

    key = b64e(bytes(32))
    return [
        None,  # the gateway's side: preamble, then a hello
        m.ClientHello("alice", "agent-1", "ssh", "access", key, "ticket 1", ("totp",)),
        m.AgentHello(("ssh", "web")),
        m.TunnelHello("ticket"),
        m.DataHello("token"),
        m.EnrollRequest("token", "csr", key),
        m.RegisterHello("alice", "fido2", "code"),
    ]


@target
def wire(data: bytes) -> bool:
    """relay.protocol.Connection: every role and state, bytes in two pieces.

    Promise: receive_data() never raises; events are messages or Closed.
    """
    from relay import message as m
    from relay import protocol as p

    if len(data) < 2:
        return False
    hellos = _hellos()
    hello = hellos[data[0] % len(hellos)]
    cut, body = data[1], data[2:]
    side = p.Side.ACCEPTOR if hello is None else p.Side.CONNECTOR
    conn = p.Connection(side, now=0.0)
    if hello is not None:
        conn.send(hello, 0.0)
        conn.data_to_send()
    conn.receive_data(body[:cut], 1.0)
    conn.receive_data(body[cut:], 2.0)
    events = conn.events_received()
    for event in events:
        if not isinstance(event, m.Message | p.Closed):
            raise Finding(f"unexpected event {event!r}")
    conn.data_to_send()
    conn.handle_timer(1000.0)
    conn.receive_eof()
    if conn.state is p.State.RAW:
        conn.take_raw()
    return any(isinstance(e, m.Message) and not isinstance(e, m.Error) for e in events)


@target
def message(data: bytes) -> bool:
    """relay.message.from_json on any JSON value: a Message or ProtocolError.

    A message that parses must survive its own encoding (what we accept, we can send).
    """
    from relay import message as m
    from relay.errors import ProtocolError

    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return False
    try:
        msg = m.from_json(obj)
    except ProtocolError:
        return False
    text = json.dumps(msg.to_json())
    again = m.from_json(json.loads(text))
    if json.dumps(again.to_json()) != text:
        raise Finding(f"{msg.TYPE} does not survive its own encoding")
    return True


# -- Noise: handshake messages, framing, tunnel records ------------------------------------

PROLOGUE = b"gw-e2e-v1\x00fuzz-session"


@target
def noise_handshake(data: bytes) -> bool:
    """relay.noise.HandshakeState.read_message, as responder (msg 1) or initiator (msg 2).

    Fixed static and ephemeral keys, so the seed messages verify and mutations reach
    every step. Promise: NoiseError or a payload; a handshake that reads completes.
    """
    from relay import noise
    from relay.errors import NoiseError

    if not data:
        return False
    responder_static = fixed_key("responder-static")
    if data[0] & 1:
        hs = noise.HandshakeState.responder(
            responder_static, PROLOGUE, ephemeral_private=fixed_key("responder-ephemeral")
        )
        try:
            hs.read_message(data[1:])
        except NoiseError:
            return False
        hs.write_message(b"")
    else:
        hs = noise.HandshakeState.initiator(
            fixed_key("initiator-static"),
            noise.public_key(responder_static),
            PROLOGUE,
            ephemeral_private=fixed_key("initiator-ephemeral"),
        )
        hs.write_message(b"")
        try:
            hs.read_message(data[1:])
        except NoiseError:
            return False
    if not hs.complete or len(hs.handshake_hash) != 32:
        raise Finding("a handshake that read its last message is not complete")
    noise.short_auth_string(hs.handshake_hash)
    return True


@target
def noise_frames(data: bytes) -> bool:
    """relay.noise.FrameReader: 2-byte-length framing of handshake messages."""
    from relay import noise
    from relay.errors import NoiseError

    if len(data) < 3:
        return False
    limit = int.from_bytes(data[:2], "big")
    cut, body = data[2], data[3:]
    reader = noise.FrameReader(limit)
    found = False
    try:
        for piece in (body[:cut], body[cut:]):
            reader.receive_data(piece)
            while (msg := reader.next_message()) is not None:
                found = True
                if len(msg) > limit:
                    raise Finding("FrameReader returned a message over its limit")
    except NoiseError:
        return False
    reader.take_remaining()
    return found


TUNNEL_KEY = hashlib.sha256(b"gw-fuzz-tunnel-key").digest()


@target
def tunnel_records(data: bytes) -> bool:
    """relay.tunnel.Opener (end-to-end records) and relay.noise.NoiseStream.

    Both decrypt with a fixed key, so seed records decrypt and mutations reach the
    record types. Promise: plaintext or NoiseError.
    """
    from relay import noise, tunnel
    from relay.errors import NoiseError

    if not data:
        return False
    cut, body = data[0], data[1:]
    opener = tunnel.Opener(noise.CipherState(TUNNEL_KEY))
    plaintext = b""
    with contextlib.suppress(NoiseError):
        for piece in (body[:cut], body[cut:]):
            chunks, ended = opener.feed(piece)
            plaintext += b"".join(chunks)
            if ended and not opener.ended:
                raise Finding("Opener said ended but is not")
    stream = noise.NoiseStream(noise.CipherState(bytes(32)), noise.CipherState(TUNNEL_KEY))
    with contextlib.suppress(NoiseError):
        plaintext += stream.receive_data(body[:cut])
        plaintext += stream.receive_data(body[cut:])
    return bool(plaintext)


# -- FIDO2: clientDataJSON, authenticatorData, attestation objects -------------------------


@functools.cache
def _fido2() -> dict[str, Any]:
    fx = _fixture("fido2.json")
    fx["binding"] = bytes.fromhex(fx["binding"])
    return fx


def _fido2_ctx(fx: dict[str, Any]) -> Any:
    from auth.base import AuthContext

    return AuthContext(
        user="alice",
        channel_binding=fx["binding"],
        now=fx["now"],
        source="192.0.2.7",
        credential=fx["record"],
        settings=fx["settings"],
    )


@functools.cache
def _fido2_key() -> Any:
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_private_key(_fido2()["private_key"].encode(), None)


@target
def fido2_login(data: bytes) -> bool:
    """auth.fido2 login check: credential_id, clientDataJSON, authenticatorData, signature.

    With the first byte odd the harness signs what it sends with the registered key,
    so that the checks after the signature (clientDataJSON, authenticatorData, the
    counter) see mutated input. Promise: an Outcome or the internal rejection.
    """
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    import auth.fido2 as f2

    if not data:
        return False
    cred_id, client_data, auth_data, signature = fields(data[1:], 4)
    if data[0] & 1:
        message = auth_data + hashlib.sha256(client_data).digest()
        signature = _fido2_key().sign(message, ec.ECDSA(hashes.SHA256()))
    fx = _fido2()
    response = {
        "credential_id": b64e(cred_id),
        "client_data_json": b64e(client_data),
        "authenticator_data": b64e(auth_data),
        "signature": b64e(signature),
    }
    settings = f2.parse_settings(fx["settings"])
    try:
        outcome = f2.Fido2Verifier()._check(_fido2_ctx(fx), settings, fx["state"], response)
    except f2._Rejected:
        return False
    json.dumps(dict(outcome.detail))
    return outcome.ok


@target
def fido2_client_data(data: bytes) -> bool:
    """auth.fido2._client_data: clientDataJSON as both checks read it."""
    import auth.fido2 as f2

    parsed = False
    for kind in ("webauthn.get", "webauthn.create"):
        with contextlib.suppress(f2._Rejected):
            f2._client_data(data, kind)
            parsed = True
    return parsed


@target
def fido2_registration(data: bytes) -> bool:
    """auth.fido2 registration check: credential_id, clientDataJSON, attestationObject.

    Promise: a new record or a rejection (AuthError / the internal rejection).
    """
    import auth.fido2 as f2
    from relay.errors import AuthError

    cred_id, client_data, attestation = fields(data, 3)
    fx = _fido2()
    response = {
        "credential_id": b64e(cred_id),
        "client_data_json": b64e(client_data),
        "attestation_object": b64e(attestation),
        "name": "key",
    }
    try:
        record, info = f2._registration_complete(fx["reg_state"], response, None, None, 1.0)
    except (f2._Rejected, AuthError):
        return False
    json.dumps(record)
    json.dumps(info)
    return True


# -- smartcards: PIV TLV answers, certificates and CRLs --------------------------------------


@functools.cache
def _smartcard() -> dict[str, Any]:
    fx = _fixture("smartcard/meta.json")
    base = FIXTURES / "smartcard"
    fx["settings"] = {
        "trust_anchors": [str(base / "root.pem")],
        "intermediates": [str(base / "intermediate.pem")],
        "crl_files": [str(base / "intermediate.crl"), str(base / "root.crl.pem")],
    }
    return fx


class ScriptedPort:
    """A card port whose answers come from the fuzz input: (data, SW) records."""

    reader = "fuzz reader"

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def transmit(self, apdu: bytes) -> tuple[bytes, int]:
        if self.pos >= len(self.data):
            return b"", 0x6A82
        length = int.from_bytes(self.data[self.pos : self.pos + 2], "big")
        body = self.data[self.pos + 2 : self.pos + 2 + length]
        self.pos = min(len(self.data), self.pos + 2 + length)
        sw = int.from_bytes(self.data[self.pos : self.pos + 2].ljust(2, b"\x90"), "big")
        self.pos += 2
        return body, sw

    def close(self) -> None:
        pass


def script(answers: list[tuple[bytes, int]]) -> bytes:
    """Encode card answers for :class:`ScriptedPort` (seeds)."""
    return b"".join(len(d).to_bytes(2, "big") + d + sw.to_bytes(2, "big") for d, sw in answers)


@target
def piv_card(data: bytes) -> bool:
    """auth.smartcard PIV client: the prover's steps against a card that says anything.

    Select, read and unpack the certificate object, parse the certificate, PIN retry
    counter, VERIFY, GENERAL AUTHENTICATE and the signature check; then the
    ``declined`` payload a prover sends when it stops. Promise: AuthError only.
    """
    from auth import smartcard as sc
    from relay.errors import AuthError

    fx = _smartcard()
    card = sc.PivCard(ScriptedPort(data))
    prover = sc.SmartcardProver(lambda: card.port, lambda text, secret: "123456", lambda: fx["now"])
    try:
        der = prover._read_certificate(card)
        cert = prover._load_certificate(der)
    except AuthError:
        return False
    stage = "certificate"
    try:
        prover._check_validity(cert)
        stage = "pin"
        card.pin_tries_left()
        sc._holder(cert)
        card.verify_pin("123456")
        stage = "signing"
        sc.sign_with_card(card, cert, b"fuzz message")
    except AuthError as exc:
        json.dumps(sc._declined(exc, stage, cert, der, fx["now"]))
        return False
    return True


@target
def piv_tlv(data: bytes) -> bool:
    """auth.smartcard._tlv_items: BER-TLV as a card sends it. Promise: ValueError only."""
    from auth import smartcard as sc

    try:
        items = list(sc._tlv_items(data))
    except ValueError:
        return False
    for _tag, value in items:
        with contextlib.suppress(ValueError):
            list(sc._tlv_items(value))
    return bool(items)


def _smartcard_check(settings: dict[str, Any], response: Any) -> bool:
    from auth import smartcard as sc
    from auth.base import AuthContext

    fx = _smartcard()
    ctx = AuthContext(
        user="alice",
        channel_binding=bytes.fromhex(fx["binding"]),
        now=fx["now"],
        source="192.0.2.7",
        credential={"cert_serial": fx["cert_serial"]},
        settings=settings,
    )
    detail: dict[str, Any] = {}
    try:
        outcome = sc.SmartcardVerifier()._complete(ctx, {"nonce": fx["nonce"]}, response, detail)
    except sc._Reject as rej:
        json.dumps({**detail, **rej.detail})
        return False
    json.dumps(dict(outcome.detail))
    return outcome.ok


_ALGORITHMS = ("rsa-pkcs1-sha256", "ecdsa-p256-sha256", "", "declined")


@target
def smartcard_response(data: bytes) -> bool:
    """The gateway's smartcard check of a client's answer: certificate, chain, signature.

    Fields: selector byte, leaf DER, chain DER x2, signature. Selector: algorithm (or a
    ``declined`` answer) and how many chain certificates are sent. Promise: an
    Outcome or the internal rejection (SmartcardVerifier.complete turns any other
    exception into "verification error": that is a finding here).
    """
    from auth import smartcard as sc

    if not data:
        return False
    leaf, chain1, chain2, signature = fields(data[1:], 4)
    algorithm = _ALGORITHMS[data[0] % 4]
    chain = [b64e(c) for c in (chain1, chain2)][: (data[0] >> 2) % 3]
    response: dict[str, Any]
    if algorithm == "declined":
        reasons = sorted(sc.DECLINED_REASONS)
        response = {
            "declined": reasons[(data[0] >> 4) % len(reasons)],
            "certificate": b64e(leaf),
            "tries_left": (data[0] >> 4) - 1,
        }
    else:
        response = {
            "certificate": b64e(leaf),
            "chain": chain,
            "algorithm": algorithm,
            "signature": b64e(signature),
        }
    return _smartcard_check(_smartcard()["settings"], response)


@functools.cache
def _scratch() -> Path:
    atexit.register(close)
    return Path(tempfile.mkdtemp(prefix="gw-fuzz-"))


def close() -> None:
    """Release what the harnesses opened (the admin server's loop, store and log; files)."""
    if _admin.cache_info().currsize:
        _admin().close()
        _admin.cache_clear()
    if _scratch.cache_info().currsize:
        shutil.rmtree(_scratch(), ignore_errors=True)
        _scratch.cache_clear()


@target
def smartcard_crl(data: bytes) -> bool:
    """A CRL file as the verifier loads and uses it (in place of the intermediate's CRL).

    A good certificate and signature are checked against it. Promise: ConfigError
    while loading, or an Outcome / the internal rejection.
    """
    from auth import smartcard as sc
    from relay.errors import ConfigError

    fx = _smartcard()
    path = _scratch() / "fuzz.crl"
    path.write_bytes(data)
    settings = {**fx["settings"], "crl_files": [str(path), fx["settings"]["crl_files"][1]]}
    sc.reload()
    try:
        sc.load_settings(settings)
    except ConfigError:
        return False
    return _smartcard_check(settings, fx["good_response"])


# -- agent enrollment: the certificate signing request ------------------------------------


@functools.cache
def _enroll_ca() -> Any:
    from gatewayd import ca

    return ca.make_ca("fuzz CA")


@target
def enroll_csr(data: bytes) -> bool:
    """gatewayd.ca.sign_agent_csr: the CSR of an enroll message (DER, sent as PEM).

    Promise: a certificate, or CAError / ValueError (the broker answers both with a
    protocol error and an audit record).
    """
    from gatewayd import ca

    pem = "-----BEGIN CERTIFICATE REQUEST-----\n"
    pem += base64.encodebytes(data).decode() + "-----END CERTIFICATE REQUEST-----\n"
    key, cert = _enroll_ca()
    try:
        ca.sign_agent_csr(key, cert, pem, "agent-1", 365)
    except (ca.CAError, ValueError):
        return False
    return True


# -- the config file and the admin socket ----------------------------------------------------


@target
def config(data: bytes) -> bool:
    """gatewayd.config.parse: the TOML config file. Promise: a Config or ConfigError."""
    from gatewayd import config as c
    from relay.errors import ConfigError

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False  # load() says so with a ConfigError before parse() sees it
    try:
        c.parse(text, _scratch() / "gatewayd.toml")
    except ConfigError:
        return False
    return True


class _Admin:
    """A real AdminServer over a real store, audit log and broker in a scratch directory."""

    def __init__(self) -> None:
        from gatewayd import config as c
        from gatewayd.admin import AdminServer
        from gatewayd.audit import AuditLog
        from gatewayd.broker import Broker
        from gatewayd.init import init
        from gatewayd.store import Store, load_secrets_key

        root = _scratch() / "admin"
        shutil.rmtree(root, ignore_errors=True)
        path, _ = init(root, ("127.0.0.1", 0), ["localhost"])
        cfg = c.load(path)
        self.loop = asyncio.new_event_loop()
        self.store = Store(cfg.store.path, load_secrets_key(cfg.store.secrets_key_file))
        self.audit = AuditLog(cfg.audit.path, node="fuzz", fsync=False)
        broker = Broker(cfg, self.store, self.audit)
        self.server = AdminServer(self.store, self.audit, broker)

    def dispatch(self, line: bytes) -> dict[str, Any]:
        reply: dict[str, Any] = self.loop.run_until_complete(self.server._dispatch(line, "fuzzer"))
        return reply

    def close(self) -> None:
        self.loop.run_until_complete(self.audit.close())
        self.loop.run_until_complete(self.store.close())
        self.loop.close()


@functools.cache
def _admin() -> _Admin:
    return _Admin()


@contextlib.contextmanager
def _fast_password_hash() -> Iterator[None]:
    """Password hashing is deliberately slow; the fuzzer wants the parser, not the KDF."""
    from auth import password

    real = password.hash_password
    password.hash_password = lambda secret: "fuzz$" + hashlib.sha256(secret.encode()).hexdigest()
    try:
        yield
    finally:
        password.hash_password = real


@target
def admin(data: bytes) -> bool:
    """gatewayd.admin: one request line on the admin socket, as an allowed user sends it.

    Promise: a JSON reply, ok or a clear error; never "internal error".
    """
    with _fast_password_hash():
        reply = _admin().dispatch(data)
    text = json.dumps(reply)
    if not isinstance(reply.get("ok"), bool):
        raise Finding(f"reply without ok: {text[:200]}")
    if not reply["ok"] and "internal error" in str(reply.get("error")):
        raise Finding(f"internal error on {data[:200]!r}")
    return reply["ok"]


# -- the cluster bus: what another node (or whoever reaches the broker) publishes ---------


class _FakeMqtt:
    """The node's MQTT connection, recording what it would publish."""

    up = True
    connections = 1

    def __init__(self, direct_topic: str) -> None:
        self.direct_topic = direct_topic
        self.sent: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        self.sent.append((topic, payload))
        return True


@functools.cache
def _cluster_node() -> tuple[Any, asyncio.AbstractEventLoop]:
    from gatewayd.agent import AgentConn, Agents
    from gatewayd.cluster import wire
    from gatewayd.cluster.directory import ClusterDirectory
    from gatewayd.config import ClusterSection
    from gatewayd.session import Approvals
    from gatewayd.tunnel import DialPairing

    class Events:
        def subscribe(self, _subscriber: Any) -> None:
            pass

    class Link:
        def send(self, _msg: Any) -> None:
            pass

    async def revalidate(_why: str) -> int:
        return 0

    dials, approvals = DialPairing(), Approvals()
    agents = Agents(
        None,  # type: ignore[arg-type]
        Events(),  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        on_dial_failed=dials.fail,
        on_approval=approvals.answer,
    )
    agents.online["pc1"] = AgentConn(
        "pc1",
        "clinic",
        Link(),
        frozenset({"echo"}),
        1.0,
        "x",  # type: ignore[arg-type]
    )
    section = ClusterSection(node_id="n3", mqtt=("127.0.0.1", 1), data_address=("h", 1))
    node = ClusterDirectory(
        agents,
        section,
        events=Events(),  # type: ignore[arg-type]
        dials=dials,
        approvals=approvals,
        revalidate=revalidate,
    )
    node.bus = _FakeMqtt(wire.direct_topic("n3"))  # type: ignore[assignment]
    return node, asyncio.new_event_loop()


@target
def cluster_note(data: bytes) -> bool:
    """gatewayd.cluster: one MQTT message on each topic a node reads (the first byte picks
    it). Promise: dropped with a log line or acted on; nothing raised out of ``receive``."""
    from gatewayd.cluster import wire

    node, loop = _cluster_node()
    topics = (
        wire.direct_topic("n3"),
        wire.BROADCAST_TOPIC,
        wire.node_topic("n1"),
        wire.agent_topic("pc1"),
        wire.agent_topic("pc2"),
        wire.node_topic("n3"),
    )
    topic = topics[data[0] % len(topics)] if data else topics[0]
    payload = data[1:]

    async def receive() -> None:
        node.receive(topic, payload)

    loop.run_until_complete(receive())
    for task in list(node.tasks):  # revalidations the note started
        loop.run_until_complete(task)
    try:
        if topic in (wire.direct_topic("n3"), wire.BROADCAST_TOPIC):
            kinds = wire.DIRECT_KINDS if topic != wire.BROADCAST_TOPIC else wire.BROADCAST_KINDS
            wire.Note.decode(payload, kinds)
        elif "/nodes/" in topic:
            wire.NodeState.decode(payload)
        else:
            wire.Presence.decode(payload)
    except wire.WireError:
        return False
    return True
