"""``gw audit``: read and verify the gateway's audit trail."""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from relay.aio import run
from relay.errors import GatewayError
from relay.text import is_printable, printable

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(value: str, now: dt.datetime | None = None) -> dt.datetime:
    """``30m``, ``2h``, ``7d`` back from now, or an RFC 3339 / ISO 8601 time (UTC if no zone)."""
    now = now or dt.datetime.now(dt.UTC)
    match = _DURATION.match(value.strip())
    if match:
        return now - dt.timedelta(seconds=float(match[1]) * _UNITS[match[2]])
    try:
        when = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise click.BadParameter(
            f"{value!r}: expected a duration (30m, 2h, 7d) or a time (2026-11-23T10:00:00Z)",
            param_hint="--since",
        ) from exc
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def records(path: Path) -> Iterator[dict[str, Any]]:
    from gatewayd.audit import read_lines

    for line in read_lines(path):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            yield rec


def _path(config_path: Path) -> Path:
    from gatewayd import config as config_mod

    try:
        return config_mod.load(config_path).audit.path
    except GatewayError as exc:
        raise click.ClickException(f"config error: {exc}") from exc


COLUMNS = ["ts", "event", "user", "agent", "target", "mode", "outcome", "reason", "source"]


def _summary(rec: dict[str, Any]) -> list[str]:
    outcome = rec.get("outcome") or rec.get("decision") or ""
    reason = rec.get("reason") or rec.get("message") or ""
    if rec.get("event") == "admin.change":
        reason = f"{rec.get('op')} by {rec.get('by')}"
    elif rec.get("factor"):
        reason = f"{rec['factor']}: {reason}"
    if rec.get("event") == "tunnel.end":
        up, down, duration = rec.get("bytes_up"), rec.get("bytes_down"), rec.get("duration")
        reason = f"{reason}; up {up} B, down {down} B, {duration} s"
    elif rec.get("event") == "connection.rejected.summary":
        raw = rec.get("codes")
        codes: dict[str, Any] = raw if isinstance(raw, dict) else {}
        kinds = ", ".join(f"{k} {v}" for k, v in codes.items())
        reason = f"{rec.get('count')} more ({kinds}) from {rec.get('first')} to {rec.get('last')}"
    elif rec.get("event") == "audit.acknowledged":
        reason = f"seq {rec.get('acknowledged_seq')} by {rec.get('by')}: {reason}"
    elif rec.get("event") == "audit.resumed":
        reason = f"{rec.get('failure')}, since {rec.get('since')}"
    values = [
        str(rec.get("ts", ""))[:23].replace("T", " "),
        str(rec.get("event", "")),
        str(rec.get("user") or ""),
        str(rec.get("agent") or ""),
        str(rec.get("target") or ""),
        str(rec.get("mode") or ""),
        str(outcome),
        str(reason),
        str(rec.get("source") or ""),
    ]
    # Fields hold what clients sent (a factor name, a reason): never raw to a terminal.
    return [printable(v) if v else "-" for v in values]


@click.group(invoke_without_command=True)
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="gatewayd's config.")
@click.option("--since", help="Only records since a duration ago (30m, 2h, 7d) or a time.")
@click.option("--user", help="Only records of this user.")
@click.option("--agent", help="Only records about this agent.")
@click.option("--event", help="Only this event (or prefix ending in '.', e.g. 'tunnel.').")
@click.option("--session", help="Only records of this session.")
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON lines.")
@click.pass_context
def audit(
    ctx: click.Context,
    config_path: Path | None,
    since: str | None,
    user: str | None,
    agent: str | None,
    event: str | None,
    session: str | None,
    as_json: bool,
) -> None:
    """Read the audit trail, filtered; `gw audit verify` checks its integrity."""
    ctx.obj = config_path
    if ctx.invoked_subcommand is not None:
        return
    if config_path is None:
        raise click.UsageError("give --config PATH")
    path = _path(config_path)
    start = parse_since(since) if since else None
    rows = []
    for rec in records(path):
        if start is not None:
            try:
                ts = dt.datetime.fromisoformat(str(rec.get("ts", "")).replace("Z", "+00:00"))
            except ValueError:
                continue
            if ts < start:
                continue
        if user and user not in (rec.get("user"), rec.get("by")):
            continue
        if agent and rec.get("agent") != agent:
            continue
        if session and rec.get("session") != session:
            continue
        if event and not (
            rec.get("event") == event
            or (event.endswith(".") and str(rec.get("event", "")).startswith(event))
        ):
            continue
        if as_json:
            click.echo(json.dumps(rec, separators=(",", ":")))
        else:
            rows.append(_summary(rec))
    if as_json:
        return
    if not rows:
        click.echo("no matching records", err=True)
        return
    widths = [min(max(len(c), *(len(r[i]) for r in rows)), 60) for i, c in enumerate(COLUMNS)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(COLUMNS, widths, strict=True)).rstrip())
    for r in rows:
        click.echo("  ".join(v[:w].ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _public_key(config_path: Path, key_file: Path | None) -> Any:
    """The key checkpoints are checked with: ``--key FILE``, else the gateway's own."""
    from gatewayd import config as config_mod
    from gatewayd.audit import AuditError, audit_key_path, load_public_key, public_key_file

    try:
        if key_file is not None:
            return load_public_key(key_file)
        key_path = audit_key_path(config_mod.load(config_path))
        pub = public_key_file(key_path)
        return load_public_key(pub if pub.exists() else key_path)
    except GatewayError as exc:
        if isinstance(exc, AuditError) and key_file is None:
            raise click.ClickException(
                f"{exc}; give the gateway's public key with --key FILE (`gw audit key` on it)"
            ) from exc
        raise click.ClickException(str(exc)) from exc


@audit.command("verify")
@click.option("--config", "config_path", type=click.Path(path_type=Path))
@click.option(
    "--key",
    "key_file",
    type=click.Path(path_type=Path),
    help="The gateway's public key (as `gw audit key` prints it, or PEM): verify elsewhere.",
)
@click.option("--path", "log_path", type=click.Path(path_type=Path), help="The trail's live file.")
@click.pass_obj
def verify_cmd(
    parent: Path | None, config_path: Path | None, key_file: Path | None, log_path: Path | None
) -> None:
    """Check the hash chain and every signed checkpoint: finds edits, deletions,
    insertions, reordering, truncation and a whole trail rewritten without the key."""
    from gatewayd.audit import verify

    path_cfg = config_path or parent
    if path_cfg is None and (log_path is None or key_file is None):
        raise click.UsageError("give --config PATH (or --path LOG --key FILE on another host)")
    path = log_path if log_path is not None else _path(path_cfg)  # type: ignore[arg-type]
    key = _public_key(path_cfg, key_file) if path_cfg is not None else _public_key_only(key_file)
    result = verify(path, key)
    for done in result.acknowledged:
        click.echo(f"acknowledged: {printable(str(done))}")
    cp = result.last_checkpoint
    if cp is not None:
        click.echo(
            f"last verified checkpoint: seq {cp.seq} at {cp.ts} ({printable(cp.where)}); "
            f"{result.checkpoints} checkpoints verified, {result.unsigned} records after it"
        )
    if result.ok:
        start = f" from seq {result.first_seq}" if result.first_seq > 1 else ""
        click.echo(f"ok: {result.records} records{start}, chain intact")
        return
    for problem in result.problems:
        click.echo(f"FAIL: {printable(problem)}", err=True)
    if any(p.gap for p in result.open):
        click.echo(
            "a gap or re-anchor may be acknowledged, once looked into, with "
            "`gw audit acknowledge --seq N --reason TEXT`",
            err=True,
        )
    sys.exit(1)


def _public_key_only(key_file: Path | None) -> Any:
    from gatewayd.audit import load_public_key

    assert key_file is not None
    try:
        return load_public_key(key_file)
    except GatewayError as exc:
        raise click.ClickException(str(exc)) from exc


@audit.command("key")
@click.option("--config", "config_path", type=click.Path(path_type=Path))
@click.pass_obj
def key_cmd(parent: Path | None, config_path: Path | None) -> None:
    """Print the public key that verifies the trail's checkpoints (keep a copy elsewhere)."""
    from gatewayd.audit import key_id, public_key_text

    path_cfg = config_path or parent
    if path_cfg is None:
        raise click.UsageError("give --config PATH")
    key = _public_key(path_cfg, None)
    click.echo(public_key_text(key))
    click.echo(f"key id: {key_id(key)}", err=True)


@audit.command("acknowledge")
@click.option("--config", "config_path", type=click.Path(path_type=Path))
@click.option("--seq", type=click.IntRange(min=1), required=True, help="The record verify names.")
@click.option("--reason", required=True, help="Why it is acknowledged (kept in the trail).")
@click.pass_obj
def acknowledge_cmd(parent: Path | None, config_path: Path | None, seq: int, reason: str) -> None:
    """Acknowledge a gap or re-anchor that `gw audit verify` reports, through the daemon.

    The running gatewayd writes the acknowledgement (``audit.acknowledged``, with
    your user name and the reason) into the chain itself; verify then accepts that
    one place and nothing else.
    """
    from gatewayd import config as config_mod
    from gatewayd.admin import AdminError, request

    from .main import EXIT_FAILED, EXIT_LOCAL, EXIT_UNREACHABLE, fail

    path_cfg = config_path or parent
    if path_cfg is None:
        raise click.UsageError("give --config PATH")
    if not reason.strip() or not is_printable(reason) or len(reason) > 1024:
        raise click.BadParameter(
            "printable text on one line, at most 1024 characters", param_hint="--reason"
        )
    try:
        socket = config_mod.load(path_cfg).admin.socket
    except GatewayError as exc:
        fail(f"config error: {exc}", EXIT_LOCAL)
    try:
        result = run(request(socket, "audit.acknowledge", {"seq": seq, "reason": reason}))
    except AdminError as exc:
        code = EXIT_UNREACHABLE if str(exc).startswith("cannot reach") else EXIT_FAILED
        fail(str(exc), code)
    click.echo(
        f"acknowledged seq {seq} ({printable(str(result.get('problem', '')))}) "
        f"in record {result.get('record')}"
    )
