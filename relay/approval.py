"""Approval at the machine: the person at the agent's computer says yes or no.

When a session needs approval (``support``, attended ``access``), the gateway
sends the agent an ``approve`` request. :class:`Approvals` asks for an answer in
every way that is set up, and the first answer wins:

- a terminal: when ``gw agent run`` runs in one, it prints who asks (user, vendor
  company), the mode, the target, the reason and the short authentication string,
  and reads y/n;
- the agent's local socket (``<state-dir>/approval.sock``): ``gw agent
  approvals`` lists pending requests, ``gw agent approve ID`` and ``gw agent deny
  ID [--reason TEXT]`` answer them. Only local users can reach a Unix socket; the
  kernel tells us which one answered (SO_PEERCRED) and that name is recorded.
  Where the kernel names no peer (Windows, macOS) the agent listens on loopback
  TCP instead and writes its port and a random token to ``<state-dir>/approval.token``,
  a file only the agent's user can read; a connection that does not present that
  token first is refused, and the answer is recorded as that user's;
- ``approval_command``: a program (a desktop prompt) started with the request in
  its environment (``GW_*`` variables); exit status 0 approves.

Every text in a request came over the wire (the vendor chose the reason, the
directory the vendor's name) and is shown and passed on escaped (:func:`relay.text.printable`):
no control character, line break or bidi override reaches the terminal, the local
socket's listing or the command's environment.

No answer within the request's time is a denial. Unattended sessions are
announced the same way (a log line, and ``approval_command`` with
``GW_EVENT=start`` or ``end``, whose exit status is ignored), so nothing happens
at the machine unseen.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import platform
from .platform import peer_user
from .text import printable

#: Longest request line on the local socket.
MAX_LINE = 4096

#: Most characters of one request field shown or passed on (the reason may have 1024;
#: a prompt that scrolls off the screen hides what matters).
MAX_SHOWN = 300


@dataclass
class Request:
    """One pending approval."""

    id: str
    user: str
    vendor: str
    vendor_name: str
    mode: str
    target: str
    reason: str
    sas: str
    expires: float  # time.monotonic() deadline
    answer: asyncio.Future[tuple[bool, str, str]] = field(repr=False)
    asked: float = field(default_factory=time.time)

    def shown(self, limit: int | None = MAX_SHOWN) -> dict[str, str]:
        """The request's texts, escaped for a terminal or an environment, each cut at
        ``limit`` characters."""
        fields = {
            "id": self.id,
            "user": self.user,
            "vendor": self.vendor,
            "vendor_name": self.vendor_name,
            "mode": self.mode,
            "target": self.target,
            "reason": self.reason,
            "sas": self.sas,
        }
        return {k: printable(v, limit) for k, v in fields.items()}

    def describe(self) -> dict[str, Any]:
        seconds_left = max(0, round(self.expires - time.monotonic()))
        return {**self.shown(), "seconds_left": seconds_left}

    def env(self, event: str) -> dict[str, str]:
        shown = self.shown(None)  # a program gets all of it (the wire bounds each field)
        env = {"GW_EVENT": event, "GW_REQUEST": shown.pop("id")}
        return env | {f"GW_{k.upper()}": v for k, v in shown.items()}


__all__ = ["Approvals", "Request", "peer_user", "request", "token_path"]


def token_path(socket_path: Path) -> Path:
    """The token file that stands for ``socket_path`` where there are no Unix sockets."""
    return socket_path.with_name("approval.token")


def _use_unix_socket() -> bool:
    return platform.unix_peer_credentials() and not os.environ.get("GW_APPROVALS_TCP")


class Approvals:
    """Pending requests of one agent and the ways to answer them."""

    def __init__(
        self,
        socket_path: Path,
        *,
        command: str | None = None,
        terminal: bool | None = None,
        log: Callable[..., None],
    ) -> None:
        self.socket_path = socket_path
        self.command = command
        self.terminal = sys.stdin.isatty() if terminal is None else terminal
        self.log = log
        self.pending: dict[str, Request] = {}
        self._server: asyncio.AbstractServer | None = None
        self._token: bytes | None = None  # loopback TCP: the secret a peer must present
        self._terminal_lock = asyncio.Lock()

    async def start(self) -> None:
        if not _use_unix_socket():
            await self._start_tcp()
            return
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.socket_path))
        # Any local user may answer (and is recorded by name); nobody remote can.
        os.chmod(self.socket_path, 0o666)  # noqa: S103 - local users answer; each is named

    async def _start_tcp(self) -> None:
        """Loopback TCP guarded by a token file only this user can read."""
        token = secrets.token_hex(32)
        self._token = token.encode()
        self._server = await asyncio.start_server(self._serve, host="127.0.0.1", port=0)
        port = self._server.sockets[0].getsockname()[1]
        body = json.dumps({"port": port, "token": token}).encode()
        try:
            platform.write_private(token_path(self.socket_path), body)
        except OSError:
            self._server.close()
            await self._server.wait_closed()
            raise

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        path = self.socket_path if self._token is None else token_path(self.socket_path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    # -- asking -----------------------------------------------------------------------

    async def ask(
        self,
        request_id: str,
        *,
        timeout: float,
        user: str,
        vendor: str,
        vendor_name: str,
        mode: str,
        target: str,
        reason: str,
        sas: str,
    ) -> tuple[bool, str, str]:
        """Ask for approval; returns (approved, by, reason). No answer in time: denied."""
        loop = asyncio.get_running_loop()
        req = Request(
            id=request_id,
            user=user,
            vendor=vendor,
            vendor_name=vendor_name,
            mode=mode,
            target=target,
            reason=reason,
            sas=sas,
            expires=time.monotonic() + timeout,
            answer=loop.create_future(),
        )
        self.pending[req.id] = req
        shown = req.shown()
        self.log(
            "approval requested",
            id=shown["id"],
            user=shown["user"],
            vendor=shown["vendor_name"],
            mode=shown["mode"],
            target=shown["target"],
            reason=shown["reason"],
            sas=shown["sas"],
        )
        helpers = []
        if self.command:
            helpers.append(loop.create_task(self._run_command(req)))
        if self.terminal:
            helpers.append(loop.create_task(self._ask_terminal(req)))
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(req.answer)
        except TimeoutError:
            return False, "", "no answer in time"
        finally:
            self.pending.pop(req.id, None)
            for task in helpers:
                task.cancel()

    def answer(self, request_id: str, approved: bool, by: str, reason: str = "") -> bool:
        req = self.pending.get(request_id)
        if req is None or req.answer.done():
            return False
        req.answer.set_result((approved, by, reason))
        return True

    async def announce(self, event: str, **fields: str) -> None:
        """Unattended session start or end: a log line and the command hook."""
        event = printable(event, MAX_SHOWN)
        self.log(
            f"unattended session {event}", **{k: printable(v, MAX_SHOWN) for k, v in fields.items()}
        )
        if self.command:
            env = {**os.environ, **{f"GW_{k.upper()}": printable(v) for k, v in fields.items()}}
            env["GW_EVENT"] = event
            with contextlib.suppress(OSError):
                proc = await asyncio.create_subprocess_shell(
                    self.command, env=env, stdin=asyncio.subprocess.DEVNULL
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(30):
                        await proc.wait()

    async def _run_command(self, req: Request) -> None:
        assert self.command is not None
        env = {**os.environ, **req.env("approve")}
        try:
            proc = await asyncio.create_subprocess_shell(
                self.command, env=env, stdin=asyncio.subprocess.DEVNULL
            )
        except OSError as exc:
            self.log("approval_command failed to start", error=str(exc))
            return
        try:
            status = await proc.wait()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        self.answer(
            req.id, status == 0, "approval_command", "" if status == 0 else f"exit {status}"
        )

    async def _ask_terminal(self, req: Request) -> None:
        async with self._terminal_lock:
            if req.answer.done():
                return
            shown = req.shown()
            who = f"{shown['user']} of {shown['vendor_name'] or shown['vendor']}"
            sys.stderr.write(
                f"\n*** Remote {shown['mode']} request from {who}\n"
                f"    target: {shown['target']}\n    reason: {shown['reason'] or '-'}\n"
                f"    code:   {shown['sas']}  (ask the caller to read theirs; they must match)\n"
                f"    Allow? [y/N] "
            )
            sys.stderr.flush()
            line = await asyncio.to_thread(sys.stdin.readline)
            yes = line.strip().lower() in ("y", "yes")
            name = platform.user_name()
            self.answer(req.id, yes, f"{name} (terminal)", "" if yes else "denied at the terminal")

    # -- the local socket ---------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._token is None:
            _, by = peer_user(writer.get_extra_info("socket"))
        else:
            # Only the agent's user can read the token file: whoever presents it is them.
            by = f"{platform.user_name()} (token)"
        try:
            line = await reader.readline()
            if len(line) > MAX_LINE:
                raise ValueError
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError
            op = req.get("op")
            if self._token is not None and not hmac.compare_digest(
                str(req.get("token", "")).encode(), self._token
            ):
                reply: dict[str, Any] = {"ok": False, "error": "wrong approvals token"}
            elif op == "list":
                reply = {"ok": True, "result": [r.describe() for r in self.pending.values()]}
            elif op in ("approve", "deny"):
                rid = str(req.get("id", ""))
                reason = str(req.get("reason", ""))[:200]
                if self.answer(rid, op == "approve", by, reason):
                    self.log(f"request {op}d", id=rid, by=by)
                    reply = {"ok": True, "result": {"id": rid, "by": by}}
                else:
                    reply = {"ok": False, "error": f"no pending request {rid!r}"}
            else:
                reply = {"ok": False, "error": "unknown operation"}
        except (ValueError, ConnectionError):
            reply = {"ok": False, "error": "malformed request"}
        with contextlib.suppress(ConnectionError):
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        writer.close()


async def request(socket_path: Path, op: str, **args: Any) -> Any:
    """Client side of the local socket, for ``gw agent approvals/approve/deny``."""
    from .errors import GatewayError

    hint = "(is `gw agent run` running with this --state-dir?)"
    where = socket_path
    try:
        if _use_unix_socket():
            reader, writer = await asyncio.open_unix_connection(str(socket_path))
        else:
            where = token_path(socket_path)
            try:
                endpoint = json.loads(where.read_bytes())
                port, token = int(endpoint["port"]), str(endpoint["token"])
            except (ValueError, KeyError, TypeError) as exc:
                raise GatewayError(f"{where} is damaged {hint}") from exc
            args = {**args, "token": token}
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        raise GatewayError(
            f"cannot reach the agent at {where}: {exc.strerror or exc} {hint}"
        ) from exc
    writer.write(json.dumps({"op": op, **args}).encode() + b"\n")
    await writer.drain()
    line = await reader.readline()
    writer.close()
    reply = json.loads(line or b"{}")
    if not reply.get("ok"):
        raise GatewayError(str(reply.get("error", "the agent refused")))
    return reply.get("result")
