"""The admin socket: how ``gw admin`` changes the directory of a running gatewayd.

A Unix socket (``admin.socket`` in the config, mode 0660). Each connection sends
one JSON request per line, ``{"op": "org.add", "args": {...}}``, and gets one JSON
reply per line, ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``.

Only root, the daemon's own user, the uids in ``admin.allowed_uids`` and members of
``admin.allowed_groups`` may talk to it; the kernel tells us who the peer is
(SO_PEERCRED). Every change is audited as ``admin.change`` with the OS user who
made it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import structlog

from auth import password as password_factor
from auth import registry, totp
from relay.approval import peer_user
from relay.errors import ConfigError, GatewayError
from relay.message import MODES, valid_id
from relay.text import is_printable

from . import audit as audit_mod
from . import card, directory, fido2_registration, grant, login
from .audit import AuditLog
from .broker import Broker
from .config import Config
from .event import AdminChanged, AdminRefused, AuditAcknowledged, Event
from .operation import Admin, Operation, arg_id, arg_text
from .operation import AdminError as AdminError  # gw admin's client side catches it
from .store import Store, StoreError

log = structlog.get_logger("gatewayd.admin")

#: Longest request line: a request names a few ids and maybe a password.
MAX_REQUEST = 64 * 1024


class AdminServer:
    def __init__(self, store: Store, audit: AuditLog, broker: Broker) -> None:
        self.store = store
        self.audit = audit
        self.broker = broker
        self.server: asyncio.AbstractServer | None = None
        self._bound: Path | None = None

    @property
    def config(self) -> Config:
        """The config in force: the broker's holder, which SIGHUP updates for every part."""
        return self.broker.holder.current

    async def record(self, event: Event) -> int:
        """Publish a durable event on the bus every part shares (audit first, then metrics)."""
        return await self.broker.bus.record(event)

    def allowed(self, uid: int, name: str) -> bool:
        import grp  # POSIX only: gw imports this module on every platform
        import pwd

        if uid in (0, os.getuid()) or uid in self.config.admin.allowed_uids:
            return True
        for group in self.config.admin.allowed_groups:
            with contextlib.suppress(KeyError):
                g = grp.getgrnam(group)
                if name in g.gr_mem or pwd.getpwuid(uid).pw_gid == g.gr_gid:
                    return True
        return False

    async def start(self) -> None:
        path = self.config.admin.socket
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        old = os.umask(0o117)
        try:
            self.server = await asyncio.start_unix_server(self._serve, path=str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o660)
        self._bound = path  # a reload may name another path; it takes effect at restart

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        if self._bound is not None:
            with contextlib.suppress(FileNotFoundError):
                self._bound.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        uid, name = peer_user(sock)
        try:
            if not self.allowed(uid, name):
                self.broker.bus.publish(AdminRefused(by=name, uid=uid))
                await self._reply(writer, {"ok": False, "error": f"user {name} may not administer"})
                return
            while line := await reader.readline():
                if len(line) > MAX_REQUEST:
                    await self._reply(writer, {"ok": False, "error": "request too large"})
                    return
                await self._reply(writer, await self._dispatch(line, name))
        except (ValueError, ConnectionError):  # over-long line, peer gone
            pass
        finally:
            writer.close()

    async def _reply(self, writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
        writer.write(json.dumps(obj).encode() + b"\n")
        await writer.drain()

    async def _dispatch(self, line: bytes, by: str) -> dict[str, Any]:
        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("args", {}), dict):
                raise ValueError
            name = req.get("op")
            handler = OPERATIONS.get(name) if isinstance(name, str) else None
            if handler is None:
                return {"ok": False, "error": f"unknown operation {str(name)[:40]!r}"}
            result = await handler(self, req.get("args", {}), by)
        except ValueError:
            return {"ok": False, "error": "malformed request"}
        except (AdminError, StoreError) as exc:
            return {"ok": False, "error": str(exc)}
        except Exception:
            log.exception("admin operation failed")
            return {"ok": False, "error": "internal error (see the gatewayd log)"}
        return {"ok": True, "result": result}

    async def changed(self, by: str, op_name: str, **fields: Any) -> None:
        await self.broker.bus.record(AdminChanged(by=by, op=op_name, touched=fields))

    def now(self) -> float:
        return self.broker.now()


async def _org_add(s: Admin, args: dict[str, Any], by: str) -> Any:
    org = arg_id(args, "org")
    await s.store.add_org(org, arg_text(args, "name", org), s.now())
    await s.changed(by, "org.add", org=org)
    return {"org": org}


async def _vendor_add(s: Admin, args: dict[str, Any], by: str) -> Any:
    vendor = arg_id(args, "vendor")
    await s.store.add_vendor(vendor, arg_text(args, "name", vendor), s.now())
    await s.changed(by, "vendor.add", vendor=vendor)
    return {"vendor": vendor}


async def _user_add(s: Admin, args: dict[str, Any], by: str) -> Any:
    user = arg_id(args, "user")
    vendor = args.get("vendor")
    org = args.get("org")
    if (vendor is None) == (org is None):
        raise AdminError(
            "a user belongs to exactly one of --vendor (vendor user) or --org (employee)"
        )
    if vendor is not None:
        vendor = arg_id(args, "vendor")
    if org is not None:
        org = arg_id(args, "org")
    secret = args.get("password")
    if secret is not None and (not isinstance(secret, str) or not 8 <= len(secret) <= 1024):
        raise AdminError("password: must be 8 to 1024 characters")
    smartcard = card.credential_from_args(s, args)  # --cert-serial / --cert-file
    await s.store.add_user(
        user, kind="vendor" if vendor else "employee", vendor=vendor, org=org, now=s.now()
    )
    if secret:
        hashed = await asyncio.to_thread(password_factor.hash_password, secret)
        await s.store.set_credential(user, "password", {"hash": hashed}, s.now())
    if smartcard is not None:
        await s.store.set_credential(user, "smartcard", smartcard, s.now())
    await s.changed(
        by,
        "user.add",
        user=user,
        vendor=vendor,
        org=org,
        password=bool(secret),
        **card.audit_fields(smartcard),
    )
    return {"user": user, **(smartcard or {})}


async def _user_password(s: Admin, args: dict[str, Any], by: str) -> Any:
    user = arg_id(args, "user")
    secret = arg_text(args, "password")
    if not 8 <= len(secret) <= 1024:
        raise AdminError("password: must be 8 to 1024 characters")
    hashed = await asyncio.to_thread(password_factor.hash_password, secret)
    await s.store.set_credential(user, "password", {"hash": hashed}, s.now())
    await s.changed(by, "user.password", user=user)
    return {"user": user}


async def _totp_enroll(s: Admin, args: dict[str, Any], by: str) -> Any:
    user = arg_id(args, "user")
    if await s.store.get_user(user) is None:
        raise AdminError(f"no user {user!r}")
    secret = totp.new_secret()
    # A new seed: any login still holding the old one fails (the version moved on), and
    # no step of the new one has been used.
    await s.store.set_credential(user, "totp", {"secret": secret}, s.now(), reset_counters=True)
    issuer = str(s.config.auth.get("totp", {}).get("issuer", "gatewayd"))
    await s.changed(by, "totp.enroll", user=user)
    return {"uri": totp.provisioning_uri(secret, user, issuer), "secret": secret}


async def _factor_enroll(s: Admin, args: dict[str, Any], by: str) -> Any:
    """Enroll a user in any factor that has an enrollment hook (a plug-in's too): the
    hook makes the credential from ``params`` and the factor's settings; it is stored
    sealed, replacing any earlier one, with its counters started afresh."""
    user = arg_id(args, "user")
    name = arg_id(args, "factor")
    params = args.get("params", {})
    if not isinstance(params, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in params.items()
    ):
        raise AdminError("params: expected KEY=VALUE texts")
    if await s.store.get_user(user) is None:
        raise AdminError(f"no user {user!r}")
    try:
        factor = registry.get(name)
    except ConfigError as exc:
        raise AdminError(str(exc)) from exc
    if factor.enroll is None:
        raise AdminError(f"factor {name!r} has no enrollment through gw admin factor enroll")
    try:
        enrolled = await asyncio.to_thread(
            factor.enroll, user, MappingProxyType(dict(params)), s.config.auth.get(name, {})
        )
    except ValueError as exc:
        raise AdminError(f"{name}: {exc}") from exc
    await s.store.set_credential(
        user, name, dict(enrolled.credential), s.now(), reset_counters=True
    )
    # The parameters' names only: their values may be secrets.
    await s.changed(by, "factor.enroll", user=user, factor=name, params=sorted(params))
    return {"user": user, "factor": name, **dict(enrolled.shown)}


async def _user_unlock(s: Admin, args: dict[str, Any], by: str) -> Any:
    """Clear a user's failed-login count and lock, including the lock that only an
    administrator can lift (after ``[lockout] hard_limit`` consecutive failures)."""
    user = arg_id(args, "user")
    before = await s.store.unlock(user)
    await s.changed(
        by,
        "user.unlock",
        user=user,
        failures=before.failures,
        locked_until=before.locked_until,
        admin_locked=before.admin_locked,
    )
    return {
        "user": user,
        "failures": before.failures,
        "was_locked": before.admin_locked or before.locked_until > s.now(),
    }


async def _agreement_add(s: Admin, args: dict[str, Any], by: str) -> Any:
    vendor = arg_id(args, "vendor")
    org = arg_id(args, "org")
    modes = args.get("modes")
    if (
        not isinstance(modes, list)
        or not modes
        or not all(x in ("access", "support") for x in modes)
    ):
        raise AdminError("modes: a list of access and/or support")
    agreement = args.get("id") or f"{vendor}-{org}-{secrets.token_hex(3)}"
    if not isinstance(agreement, str) or not valid_id(agreement):
        raise AdminError("id: expected an identifier")
    valid_from, valid_until = args.get("valid_from"), args.get("valid_until")
    for key, value in (("valid_from", valid_from), ("valid_until", valid_until)):
        if value is not None and not isinstance(value, int | float):
            raise AdminError(f"{key}: expected a POSIX time")
    await s.store.add_agreement(
        agreement,
        vendor=vendor,
        org=org,
        modes=tuple(dict.fromkeys(modes)),
        unattended=bool(args.get("unattended")),
        valid_from=valid_from,
        valid_until=valid_until,
        accepted=False,  # both sides accept the terms of use with `agreement accept`
        now=s.now(),
    )
    await s.changed(
        by,
        "agreement.add",
        agreement=agreement,
        vendor=vendor,
        org=org,
        modes=modes,
        unattended=bool(args.get("unattended")),
    )
    return {"agreement": agreement}


async def _agent_add(s: Admin, args: dict[str, Any], by: str) -> Any:
    agent = arg_id(args, "agent")
    org = arg_id(args, "org")
    ttl = args.get("ttl", s.config.enrollment.token_ttl)
    if not isinstance(ttl, int | float) or not 60 <= ttl <= 30 * 86400:
        raise AdminError("ttl: between 60 seconds and 30 days")
    token = secrets.token_urlsafe(32)
    expires = s.now() + ttl
    await s.store.add_agent(agent, org, token, expires, s.now())
    await s.changed(by, "agent.add", agent=agent, org=org, token_expires=expires)
    return {"agent": agent, "token": token, "expires": expires}


async def _list(s: Admin, args: dict[str, Any], by: str) -> Any:
    table = arg_text(args, "what")
    if table not in ("orgs", "vendors", "users", "agents", "agreements"):
        raise AdminError("what: one of orgs, vendors, users, agents, agreements")
    rows = await s.store.list_rows(table)
    if table == "agents":
        online = s.broker.online_agents()
        for row in rows:
            row["online"] = row["id"] in online
    return rows


async def _sessions_list(s: Admin, args: dict[str, Any], by: str) -> Any:
    return s.broker.session_rows()


async def _sessions_kill(s: Admin, args: dict[str, Any], by: str) -> Any:
    sid = arg_text(args, "session")
    try:  # the session may be held by another node of a cluster
        killed = await s.broker.end_session(sid, f"killed by {by}")
    except GatewayError as exc:
        raise AdminError(str(exc)) from exc
    if not killed:
        raise AdminError(f"no live session {sid!r}")
    await s.changed(by, "sessions.kill", session=sid)
    return {"session": sid}


async def _status(s: Admin, args: dict[str, Any], by: str) -> Any:
    return {
        "node": s.config.gateway.node_id,
        "agents_online": sorted(s.broker.online_agents()),
        "sessions": s.broker.session_count(),
        "audit": s.audit.failure or "ok",
        # Rejected connections counted towards a summary record not written yet.
        "rejections_pending": s.broker.rejections_pending(),
        "modes": {m: [list(step) for step in s.config.mode(m).factors] for m in MODES},
        **({"cluster": cluster} if (cluster := s.broker.cluster_status()) is not None else {}),
    }


async def _audit_acknowledge(s: Admin, args: dict[str, Any], by: str) -> Any:
    """An operator has looked into a gap or re-anchor that verify reports: say so in the chain."""
    seq = args.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise AdminError("seq: expected a sequence number")
    reason = arg_text(args, "reason").strip()
    if not reason or len(reason) > 1024 or not is_printable(reason):
        raise AdminError("reason: printable text on one line, at most 1024 characters")
    key = s.audit.signer.public_key() if s.audit.signer is not None else None
    result = await asyncio.to_thread(audit_mod.verify, s.audit.path, key)
    at_seq = [p for p in result.open if p.seq == seq]
    gaps = [p for p in at_seq if p.gap]
    if not gaps:
        if at_seq:
            raise AdminError(
                f"seq {seq}: {at_seq[0].text}: a change, not a gap; it cannot be acknowledged"
            )
        raise AdminError(f"seq {seq}: verify reports no unacknowledged gap or re-anchor there")
    problem = gaps[0]
    record = await s.record(
        AuditAcknowledged(
            by=by,
            acknowledged_seq=seq,
            acknowledged_hash=problem.hash,
            problem=str(problem),
            reason=reason,
        )
    )
    return {"seq": seq, "problem": str(problem), "record": record}


async def request(path: Path, op_name: str, args: dict[str, Any], timeout: float = 30.0) -> Any:
    """Client side: send one request to the admin socket and return its result."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(path), limit=MAX_REQUEST * 16), timeout
        )
    except (OSError, TimeoutError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "timed out"
        raise AdminError(
            f"cannot reach gatewayd at {path}: {reason} (is the daemon running?)"
        ) from exc
    try:
        writer.write(json.dumps({"op": op_name, "args": args}).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    finally:
        writer.close()
    if not line:
        raise AdminError("gatewayd closed the admin connection")
    reply = json.loads(line)
    if not reply.get("ok"):
        raise AdminError(str(reply.get("error", "request failed")))
    return reply.get("result")


#: Every operation of the admin socket, by the name a request gives (``op``). The
#: modules that define some beside their feature import only :mod:`gatewayd.operation`.
OPERATIONS: Mapping[str, Operation] = MappingProxyType(
    {
        "org.add": _org_add,
        "vendor.add": _vendor_add,
        "user.add": _user_add,
        "user.password": _user_password,
        "totp.enroll": _totp_enroll,
        "factor.enroll": _factor_enroll,
        "user.unlock": _user_unlock,
        "user.logout": login.user_logout,
        "agreement.add": _agreement_add,
        "agent.add": _agent_add,
        "list": _list,
        "sessions.list": _sessions_list,
        "sessions.kill": _sessions_kill,
        "status": _status,
        "audit.acknowledge": _audit_acknowledge,
        "user.set_cert": card.user_set_cert,
        "disable": directory.disable,
        "enable": directory.enable,
        "remove": directory.remove,
        "show": directory.show,
        "agreement.accept": directory.accept_agreement,
        "agreement.state": directory.agreement_state,
        "vendor.networks": directory.vendor_networks,
        "grant.add": grant.grant_add,
        "grant.remove": grant.grant_remove,
        "fido2.invite": fido2_registration.invite,
        "fido2.list": fido2_registration.list_keys,
        "fido2.remove": fido2_registration.remove_key,
    }
)
