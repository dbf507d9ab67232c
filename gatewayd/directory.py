"""Directory life cycle through ``gw admin``: show, disable, enable, remove; agreements.

Every change is audited as ``admin.change`` and is followed by
:meth:`gatewayd.broker.Broker.revalidate`, so a live session that no longer
passes the policy (its user, vendor, agreement or agent disabled, a grant taken
back) ends within a second, at both ends.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from .operation import Admin, AdminError, arg_id

#: Tables an admin can disable, by the noun ``gw admin`` uses.
_TABLES = {"user": "users", "vendor": "vendors", "agent": "agents", "org": "orgs"}


def _noun(args: dict[str, Any]) -> tuple[str, str]:
    noun = args.get("kind")
    if noun not in _TABLES:
        raise AdminError(f"kind: one of {', '.join(_TABLES)}")
    return str(noun), _TABLES[str(noun)]


async def _after_change(s: Admin, by: str, op_name: str, **fields: Any) -> int:
    await s.changed(by, op_name, **fields)
    return await s.broker.revalidate(f"{op_name} by {by}")


async def disable(s: Admin, args: dict[str, Any], by: str) -> Any:
    noun, table = _noun(args)
    ident = arg_id(args, "id")
    await s.store.set_disabled(table, ident, True)
    ended = await _after_change(s, by, f"{noun}.disable", **{noun: ident})
    return {noun: ident, "sessions_ended": ended}


async def enable(s: Admin, args: dict[str, Any], by: str) -> Any:
    noun, table = _noun(args)
    ident = arg_id(args, "id")
    await s.store.set_disabled(table, ident, False)
    await s.changed(by, f"{noun}.enable", **{noun: ident})
    return {noun: ident}


async def remove(s: Admin, args: dict[str, Any], by: str) -> Any:
    noun = args.get("kind")
    table = {**_TABLES, "agreement": "agreements"}.get(str(noun))
    if table is None:
        raise AdminError("kind: one of user, vendor, agent, org, agreement")
    ident = arg_id(args, "id")
    await s.store.remove(table, ident)
    ended = await _after_change(s, by, f"{noun}.remove", **{str(noun): ident})
    return {str(noun): ident, "sessions_ended": ended}


async def show(s: Admin, args: dict[str, Any], by: str) -> Any:
    noun = str(args.get("kind"))
    table = {**_TABLES, "agreement": "agreements"}.get(noun)
    if table is None:
        raise AdminError("kind: one of user, vendor, agent, org, agreement")
    ident = arg_id(args, "id")
    rows = await s.store.list_rows(table, ident)
    if not rows:
        raise AdminError(f"no {noun} {ident!r}")
    row = rows[0]
    if noun == "user":
        row["factors"] = sorted(await s.store.credential_methods(ident))
        row["grants"] = sorted(await s.store.grants_of(ident))
    if noun == "agent":
        targets = s.broker.online_agents().get(ident)
        row["online"] = targets is not None
        row["targets"] = sorted(targets or ())
    if noun == "vendor":
        row["source_networks"] = json.loads(row.get("source_networks") or "[]")
    row["sessions"] = [
        r["session"] for r in s.broker.session_rows() if ident in (r["user"], r["agent"])
    ]
    return row


async def accept_agreement(s: Admin, args: dict[str, Any], by: str) -> Any:
    agreement = arg_id(args, "agreement")
    side = args.get("side")
    if side not in ("vendor", "org"):
        raise AdminError("side: vendor or org")
    await s.store.accept_agreement(agreement, str(side), s.now())
    await s.changed(by, "agreement.accept", agreement=agreement, side=side)
    return {"agreement": agreement, "side": side}


async def agreement_state(s: Admin, args: dict[str, Any], by: str) -> Any:
    agreement = arg_id(args, "agreement")
    state = args.get("state")
    if state not in ("active", "suspended"):
        raise AdminError("state: active or suspended")
    await s.store.set_agreement_state(agreement, str(state))
    op_name = "agreement.suspend" if state == "suspended" else "agreement.resume"
    ended = await _after_change(s, by, op_name, agreement=agreement)
    return {"agreement": agreement, "state": state, "sessions_ended": ended}


async def vendor_networks(s: Admin, args: dict[str, Any], by: str) -> Any:
    vendor = arg_id(args, "vendor")
    networks = args.get("networks")
    if not isinstance(networks, list) or not all(isinstance(n, str) for n in networks):
        raise AdminError("networks: a list of CIDRs (an empty list allows any source)")
    try:
        parsed = [str(ipaddress.ip_network(n, strict=False)) for n in networks]
    except ValueError as exc:
        raise AdminError(f"networks: {exc}") from exc
    await s.store.set_source_networks(vendor, parsed)
    ended = await _after_change(s, by, "vendor.networks", vendor=vendor, networks=parsed)
    return {"vendor": vendor, "networks": parsed, "sessions_ended": ended}
