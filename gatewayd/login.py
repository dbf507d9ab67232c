"""Login: the factor steps of a mode, the lockout around each, the login rate limits.

:meth:`Login.authenticate` proves every factor a mode asks for over one link and
publishes an :class:`~gatewayd.event.AuthAttempt` for each (an
:class:`~gatewayd.event.AuthLocked` when a failure locks the account). The peer
learns only ``auth_failed``; the event carries the specific reason.

It reads the store (users, credentials, the lockout) and changes it only by its
conditional updates; it holds no state of its own besides the rate limiters.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
from collections import deque
from typing import Any

from auth import registry
from auth.base import AuthContext, Outcome
from relay import credential
from relay import message as m
from relay.aio import ConnectionClosed, FramedLink
from relay.errors import ConfigError, RemoteError

from . import policy
from .clock import Clock
from .config import Config, ConfigHolder
from .event import AuthAttempt, AuthLocked, EventBus
from .operation import Admin, AdminError, arg_id
from .store import (
    Attempt,
    AttemptEnd,
    Credential,
    Lockout,
    LoginCredential,
    Store,
    User,
)

#: Seconds a person gets for each factor (typing a code, a PIN, touching a key).
AUTH_STEP_TIMEOUT = 120.0

_REPLAYED = "already used (a replay, or a concurrent login with the same proof)"
_CHANGED = "credential changed during the login (by an administrator or another login)"


class SlidingWindow:
    """Events per key (a source, see :func:`source_key`; a user name) in any 60-second window."""

    WINDOW = 60.0
    #: Keys remembered at most; the oldest are forgotten first (bounded memory).
    MAX_SOURCES = 100_000

    def __init__(self) -> None:
        self._hits: dict[str, deque[float]] = {}

    def count(self, key: str, now: float, limit: int) -> bool:
        """Count one event for ``key`` at ``now``; False (and not counted) when over ``limit``."""
        hits = self._hits.get(key)
        if hits is None:
            if len(self._hits) >= self.MAX_SOURCES:
                self._hits.pop(next(iter(self._hits)))
            hits = self._hits[key] = deque()
        while hits and hits[0] <= now - self.WINDOW:
            hits.popleft()
        if len(hits) >= limit:
            return False
        hits.append(now)
        return True


class RateLimiter(SlidingWindow):
    """At most ``limit`` events per key in any 60-second window."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def allow(self, source: str, now: float) -> bool:
        return self.count(source, now, self.limit)


def _host(source: str) -> str:
    return source.rpartition(":")[0].strip("[]") or source


def source_key(source: str) -> str:
    """Whom a source address's rate limit counts: the IPv4 address, or the IPv6 /64.

    One IPv6 host commonly holds a whole /64 (SLAAC, privacy addresses), so counting
    single IPv6 addresses would give it 2**64 budgets (RFC 7707, section 3).
    """
    host = _host(source)
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Login:
    """Proves a login's factors; one per gatewayd, shared by every connection."""

    def __init__(self, holder: ConfigHolder, store: Store, bus: EventBus, clock: Clock) -> None:
        self.holder = holder
        self.store = store
        self.bus = bus
        self.clock = clock
        limits = holder.current.limits
        self.auth_limiter = RateLimiter(limits.auth_per_minute)
        self.user_limiter = RateLimiter(limits.auth_per_user_per_minute)

    @property
    def config(self) -> Config:
        return self.holder.current

    def rate_limited(self, source: str, user: str) -> str | None:
        """Whether a login from ``source`` as ``user`` is over a limit: ``source``,
        ``user`` or None. Counted per source (an IPv6 /64 counts as one) and per
        claimed user name, known or not, so that many sources cannot spread guesses
        at one account past the lockout."""
        now = self.clock.monotonic()
        self.user_limiter.limit = self.config.limits.auth_per_user_per_minute
        if not self.auth_limiter.allow(source_key(source), now):
            return "source"
        if not self.user_limiter.allow(user, now):
            return "user"
        return None

    def choose(self, step: tuple[str, ...], offered: tuple[str, ...], enrolled: set[str]) -> str:
        """Pick the factor of a step: one the client offers and the user holds, if any."""
        for name in offered:
            if name in step and name in enrolled:
                return name
        for name in step:
            if name in enrolled:
                return name
        return step[0]

    def _lockout(self) -> Lockout:
        lo = self.config.lockout
        return Lockout(
            threshold=lo.threshold,
            base_seconds=lo.base_seconds,
            max_seconds=lo.max_seconds,
            decay_seconds=lo.decay_seconds,
            hard_limit=lo.hard_limit,
            slot_lease=AUTH_STEP_TIMEOUT,
        )

    async def authenticate(
        self, link: FramedLink, hello: m.ClientHello, sid: str, *, card_only: bool = False
    ) -> bool:
        """Prove every factor of the mode; audit each attempt. True when all passed.

        ``card_only``: a ``gw login`` credential proved the user (:meth:`prove_login`);
        only the mode's smartcard steps run, and only when the mode ends sessions on
        card removal (the credential is then useless without the card).

        Nothing read before an ``await`` is written back after it. Each factor's check
        runs in a slot of the store's lockout (:meth:`Store.begin_attempt`, taken once
        the answer is in, so the lock is checked before every factor), its outcome is
        counted and the lock decided in the same transaction that gives the slot back,
        and a lock set meanwhile by a parallel connection fails even a right answer.
        What an accepted factor changes (a TOTP step, a key's counter, a rehashed
        password) is applied by a conditional update; if that fails (a replay, or the
        credential was changed by an administrator while this login waited), the
        login fails.
        """
        cfg = self.config
        lockout = self._lockout()
        user = await self.store.get_user(hello.user)
        binding = link.channel_binding()
        enrolled = set(await self.store.credential_methods(hello.user)) if user else set()
        steps = cfg.mode(hello.mode).factors
        if card_only:
            card = cfg.mode(hello.mode).end_on_card_removal
            steps = tuple(step for step in steps if card and "smartcard" in step)
        for index, step in enumerate(steps):
            method = self.choose(step, hello.factors, enrolled)
            try:
                verifier = registry.get(method).verifier()
            except ConfigError as exc:
                # A plug-in that does not load (or a missing optional dependency): this
                # login fails with the reason on the record; the daemon serves on.
                self.bus.publish(
                    AuthAttempt(
                        session=sid,
                        user=hello.user,
                        factor=method,
                        outcome="failure",
                        reason=f"factor unavailable: {exc}",
                        source=link.peer,
                        mode=hello.mode,
                        agent=hello.agent,
                    )
                )
                await self.bus.flush()
                link.send_error("auth_failed", "authentication failed")
                return False
            credential = await self.store.load_credential(hello.user, method) if user else None
            ctx = AuthContext(
                user=hello.user,
                channel_binding=binding,
                now=self.clock.now(),
                source=link.peer,
                credential=credential.data if credential else None,
                settings=cfg.auth.get(method, {}),
                counters=credential.counters if credential else {},
            )
            challenge = verifier.begin(ctx)
            link.extend_handshake(AUTH_STEP_TIMEOUT)
            link.send(m.AuthRequest(method, challenge.payload))
            try:
                response = await link.expect(m.AuthResponse)
            except (ConnectionClosed, RemoteError) as exc:
                # The client gave up on this factor (no security key, wrong key, no touch):
                # still an attempt on the record. Not counted towards the lockout.
                self.bus.publish(
                    AuthAttempt(
                        session=sid,
                        user=hello.user,
                        factor=method,
                        outcome="failure",
                        reason=f"no answer from the client ({exc.code})",
                        source=link.peer,
                        mode=hello.mode,
                        agent=hello.agent,
                    )
                )
                raise
            assert isinstance(response, m.AuthResponse)
            # The lock, checked before this factor: a slot, or why not.
            attempt = Attempt.UNKNOWN
            if user is not None and not user.disabled:
                attempt = await self.store.begin_attempt(hello.user, self.clock.now(), lockout)
            try:
                if response.method != method:
                    outcome = Outcome.reject(f"answered {response.method[:32]}")
                else:
                    outcome = await asyncio.to_thread(
                        verifier.complete, ctx, challenge.state, response.payload
                    )
                outcome_ok, reason, detail = outcome.ok, outcome.reason, dict(outcome.detail)
                refused = None
                if index == 0 and user is not None:
                    # Told only after the first factor, with the answer an unknown user gets.
                    refused = await self.source_refused(user, link.peer)
                verified = outcome_ok and attempt is Attempt.GO
                if verified and refused is None and credential is not None:
                    verified, why = await self._apply(hello.user, method, credential, outcome)
                    if not verified:
                        outcome_ok, reason = False, why
            except BaseException:
                # Cancelled, or the verifier's settings or the store failed: free the
                # slot without counting (the end below is never reached).
                if attempt is Attempt.GO:
                    await self.store.cancel_attempt(hello.user)
                raise
            # Checked after the factor ran, so the answer takes as long either way.
            if user is None:
                outcome_ok, reason = False, "unknown user"
            elif user.disabled:
                outcome_ok, reason = False, "user disabled"
            elif attempt is not Attempt.GO:
                outcome_ok, reason = False, f"{attempt.value} ({reason})"
            elif refused is not None:
                outcome_ok, reason = False, refused if outcome_ok else f"{refused} ({reason})"
            if attempt is Attempt.GO:
                # The lock, checked after this factor: counted and decided atomically.
                end = await self.store.end_attempt(
                    hello.user,
                    ok=verified,  # a refused source is not a wrong answer: not counted
                    final=index == len(steps) - 1 and outcome_ok,
                    now=self.clock.now(),
                    policy=lockout,
                )
                if end.newly_locked is not None:
                    self._audit_locked(hello.user, end)
                if outcome_ok and end.locked(self.clock.now()):
                    outcome_ok, reason = False, "account locked meanwhile by other attempts"
            self.bus.publish(
                AuthAttempt(
                    session=sid,
                    user=hello.user,
                    factor=method,
                    outcome="success" if outcome_ok else "failure",
                    reason=reason,
                    source=link.peer,
                    mode=hello.mode,
                    agent=hello.agent,
                    detail={k: v for k, v in detail.items() if k not in ("event", "seq", "ts")},
                )
            )
            if not outcome_ok:
                await self.bus.flush()
                link.send_error("auth_failed", "authentication failed")
                return False
        return True

    async def _apply(
        self, user: str, method: str, credential: Credential, outcome: Outcome
    ) -> tuple[bool, str]:
        """Store what an accepted factor changes, conditionally; (applied, why not)."""
        now = self.clock.now()
        if outcome.counter is not None:
            key, value = outcome.counter
            if not await self.store.advance_counter(
                user, method, key, value, version=credential.version, now=now
            ):
                # Which condition failed, for the audit record: the counter is already
                # there (a replay), or the credential or the key is not what was verified.
                now_stored = await self.store.load_credential(user, method)
                reached = now_stored.counters.get(key) if now_stored is not None else None
                version_kept = now_stored is not None and now_stored.version == credential.version
                if reached is not None and reached >= value and (key or version_kept):
                    return False, f"{_REPLAYED} (counter {value} already reached)"
                return False, _CHANGED
        elif await self.store.credential_version(user, method) != credential.version:
            return False, _CHANGED
        if outcome.rehash is not None and not await self.store.replace_credential(
            user, method, dict(outcome.rehash), credential.version, now
        ):
            return False, _CHANGED
        return True, "ok"

    def _audit_locked(self, user: str, end: AttemptEnd) -> None:
        if end.admin_locked:
            self.bus.publish(
                AuthLocked(
                    user=user,
                    failures=end.failures,
                    seconds=None,
                    until="unlocked by an administrator",
                )
            )
        else:
            self.bus.publish(AuthLocked(user=user, failures=end.failures, seconds=end.newly_locked))

    async def prove_login(
        self, link: FramedLink, hello: m.ClientHello, sid: str
    ) -> LoginCredential | None:
        """The client proves it holds the key of the ``gw login`` credential it names.

        The gateway sends a fresh nonce; the client signs it with the TLS channel's
        exporter (:mod:`relay.credential`), so a proof is worth nothing on any other
        connection. The credential must be the user's, for this mode, not ended, not
        expired and used within its idle time; the use is recorded by one conditional
        update (:meth:`Store.use_login`), so a logout or an administrator's ending that
        lands meanwhile wins. The attempt is audited as factor ``credential`` with the
        ``login_session`` that made it. The peer learns ``login_ended`` for a credential
        that has ended (after a right proof, or for an id nobody holds) and
        ``auth_failed`` for a wrong proof or another user's credential; None then.
        """
        nonce = secrets.token_bytes(credential.NONCE_LEN)
        binding = link.channel_binding()
        challenge = {"credential": hello.credential, "nonce": credential.b64(nonce)}
        link.extend_handshake(AUTH_STEP_TIMEOUT)
        link.send(m.AuthRequest(credential.METHOD, challenge))
        login: LoginCredential | None = None

        def attempt(outcome: str, reason: str) -> AuthAttempt:
            return AuthAttempt(
                session=sid,
                user=hello.user,
                factor=credential.METHOD,
                outcome=outcome,
                reason=reason,
                source=link.peer,
                mode=hello.mode,
                agent=hello.agent,
                detail={"credential": hello.credential}
                | ({"login_session": login.session} if login is not None else {}),
            )

        try:
            response = await link.expect(m.AuthResponse)
        except (ConnectionClosed, RemoteError) as exc:
            self.bus.publish(attempt("failure", f"no answer from the client ({exc.code})"))
            raise
        assert isinstance(response, m.AuthResponse)
        login = await self.store.get_login(hello.credential)
        user = await self.store.get_user(hello.user)
        now = self.clock.now()
        code, reason = "auth_failed", ""
        if login is None:
            code, reason = "login_ended", "unknown login credential"
        elif response.method != credential.METHOD or not credential.verify(
            credential.unb64(login.public_key), hello.credential, nonce, binding, response.payload
        ):
            reason = "wrong proof of the login credential's key"
        elif login.user != hello.user:
            reason = f"login credential of another user ({login.user})"
        elif login.mode != hello.mode:
            reason = f"login credential for mode {login.mode}"
        elif user is None or user.disabled:
            reason = "unknown user" if user is None else "user disabled"
        elif user.admin_locked:
            reason = Attempt.ADMIN_LOCKED.value
        elif (refused := await self.source_refused(user, link.peer)) is not None:
            reason = refused
        elif hello.logout:
            pass  # ended by the caller: a credential past its time can still be logged out
        elif login.ended is not None:
            code, reason = "login_ended", f"login ended ({login.ended_reason})"
        elif now >= login.expires:
            code, reason = "login_ended", "login expired"
        elif not await self.store.use_login(login.id, now):
            idle = login.last_used + login.idle_timeout <= now
            code = "login_ended"
            reason = "login idle timeout" if idle else "login ended meanwhile"
        if login is not None and reason in ("login expired", "login idle timeout"):
            # Ended for good: a wall clock set back later cannot revive it.
            await self.store.end_logins(login.user, now, reason[6:], login.id)
        self.bus.publish(attempt("failure" if reason else "success", reason or "ok"))
        if reason:
            await self.bus.flush()
            if code == "login_ended":
                link.send_error(code, "your gw login has ended; run gw login again")
            else:
                link.send_error(code, "authentication failed")
            return None
        return login

    async def source_refused(self, user: User, source: str) -> str | None:
        """A vendor may restrict where its users log in from (CIDRs in the directory).

        Why this source is refused, or None. Asked only after the first factor ran, so
        that the answer (``auth_failed``) and its timing are an unknown user's: the
        check cannot tell whether a user exists.
        """
        if user.vendor is None:
            return None
        networks = await self.store.source_networks(user.vendor)
        if policy.source_allowed(networks, source):
            return None
        return f"source address not allowed for vendor {user.vendor}"

    async def card_proved(self, hello: m.ClientHello) -> bool:
        """Whether a smartcard was one of the factors this login proved.

        Every step's factor passed, and each was picked by :meth:`choose` from the mode,
        what the client offered and what the user holds; the same choice, made again.
        """
        enrolled = set(await self.store.credential_methods(hello.user))
        steps = self.config.mode(hello.mode).factors
        return any(self.choose(step, hello.factors, enrolled) == "smartcard" for step in steps)


async def user_logout(s: Admin, args: dict[str, Any], by: str) -> Any:
    """``gw admin user logout USER``: end every ``gw login`` credential of the user.

    Sessions open with one end too, on every node (the ``admin.change`` makes each node
    re-check its live sessions); no new login, session or agent list is had with the
    credentials from now on.
    """
    user = arg_id(args, "user")
    if await s.store.get_user(user) is None:
        raise AdminError(f"no user {user!r}")
    ended = await s.store.end_logins(user, s.now(), f"ended by administrator {by}")
    await s.changed(by, "user.logout", user=user, credentials=ended)
    sessions = await s.broker.revalidate(f"user.logout by {by}") if ended else 0
    return {"user": user, "ended": ended, "sessions_ended": sessions}
