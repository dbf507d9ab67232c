"""Enrollment: a new agent trades its one-time token for a certificate.

The token was made by ``gw admin agent add`` (only its hash is stored). The agent
sends it with a certificate signing request and its end-to-end public key; the
gatewayd's CA signs the request for the agent's id and the token is used up in the
same transaction that stores the certificate's fingerprint. Every attempt is on the
record (:class:`~gatewayd.event.AgentEnrolled`, durable before the answer).

Throttle: failed enrollments, not valid tokens. An organisation enrolls hundreds of
PCs from behind one address, so a valid token is never refused for the ones before it;
a source that presented ``[limits] auth_per_minute`` bad tokens in the last minute is
refused (``rate_limited``) until the oldest is a minute old. An attempt in flight
counts as a failure until it succeeds, so parallel guesses get no more tries.
"""

from __future__ import annotations

import contextlib

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PublicKey
from cryptography.hazmat.primitives.serialization import Encoding

from auth.base import b64d
from relay import message as m
from relay.aio import FramedLink

from . import ca
from .clock import Clock
from .config import Config, ConfigHolder
from .event import AgentEnrolled, EventBus
from .login import SlidingWindow, source_key
from .rejection import RejectionLog
from .store import Store


class FailureThrottle(SlidingWindow):
    """Failed attempts per source (see :func:`~gatewayd.login.source_key`) in any
    60-second window; an attempt counts from its start and is taken back if it succeeds."""

    def begin(self, source: str, now: float, limit: int) -> bool:
        """Count one attempt from ``source``; False (and not counted) when over ``limit``."""
        return self.count(source, now, limit)

    def succeeded(self, source: str, started: float) -> None:
        """The attempt begun at ``started`` worked: it is no failure."""
        hits = self._hits.get(source)
        if hits is not None:
            with contextlib.suppress(ValueError):
                hits.remove(started)


class Enrollment:
    def __init__(
        self,
        holder: ConfigHolder,
        store: Store,
        bus: EventBus,
        clock: Clock,
        *,
        rejections: RejectionLog,
        ca_key: EllipticCurvePrivateKey,
        ca_cert: x509.Certificate,
    ) -> None:
        self.holder = holder
        self.store = store
        self.bus = bus
        self.clock = clock
        self.failures = FailureThrottle()
        self.rejections = rejections
        self.ca_key = ca_key
        self.ca_cert = ca_cert

    @property
    def config(self) -> Config:
        return self.holder.current

    async def serve(self, link: FramedLink, hello: m.EnrollRequest) -> None:
        source = link.peer
        key, started = source_key(source), self.clock.monotonic()
        if not self.failures.begin(key, started, self.config.limits.auth_per_minute):
            self.rejections.refuse(
                "agent.enroll",
                source,
                "enroll_rate_limited",
                self.clock.now(),
                outcome="failure",
                reason="rate limited",
            )
            link.send_error("rate_limited", "too many failed enrollments; try again later")
            return
        now = self.clock.now()
        agent_id = await self.store.agent_for_token(hello.token, now)
        if agent_id is None:
            await self.bus.record(
                AgentEnrolled(
                    agent=None,
                    source=source,
                    outcome="failure",
                    reason="unknown, used or expired token",
                )
            )
            link.send_error("auth_failed", "enrollment token unknown, used or expired")
            return
        try:
            noise_key = b64d(hello.noise_key)
            if len(noise_key) != 32:
                raise ValueError("noise key must be 32 bytes")
            if hello.pq_key:  # an ML-KEM-768 encapsulation key (FIPS 203 7.2's checks)
                MLKEM768PublicKey.from_public_bytes(b64d(hello.pq_key))
            cert = ca.sign_agent_csr(
                self.ca_key, self.ca_cert, hello.csr, agent_id, self.config.enrollment.cert_days
            )
        except (ValueError, ca.CAError) as exc:
            await self.bus.record(
                AgentEnrolled(agent=agent_id, source=source, outcome="failure", reason=str(exc))
            )
            link.send_error("protocol_error", str(exc))
            return
        der = cert.public_bytes(Encoding.DER)
        taken = await self.store.take_enrollment(
            hello.token, ca.fingerprint(der), hello.noise_key, now, hello.pq_key or None
        )
        if taken != agent_id:
            link.send_error("auth_failed", "enrollment token unknown, used or expired")
            return
        self.failures.succeeded(key, started)
        await self.bus.record(
            AgentEnrolled(
                agent=agent_id, source=source, outcome="success", fingerprint=ca.fingerprint(der)
            )
        )
        link.send(m.Enrolled(agent=agent_id, certificate=ca.cert_pem(cert).decode()))
