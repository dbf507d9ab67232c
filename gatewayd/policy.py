"""Who may reach what: deny by default, every decision with its reason.

Pure functions over directory records; the broker looks the records up, calls
:func:`decide` and audits the :class:`Decision` it returns, allow or deny.

Rules (REQUIREMENTS.md, ARCHITECTURE.md "Authorization model"):

- a disabled user, agent or vendor gets nothing;
- ``access`` and ``support`` are for vendor users, under an agreement between
  their vendor and the agent's org that is active, inside its validity window,
  accepted by both sides and covers the mode. ``support`` always needs the
  approval of the person at the machine; ``access`` needs it unless the agreement
  allows unattended access;
- ``homeoffice`` is for employees of the agent's own org, and only to the agents
  granted to them as their dedicated equipment.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from .store import Agent, Agreement, User


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str
    needs_approval: bool = False
    agreement: str | None = None


def deny(reason: str) -> Decision:
    return Decision(False, reason)


def _agreement_problem(a: Agreement, mode: str, now: float) -> str | None:
    if a.state != "active":
        return f"agreement {a.id} is {a.state}"
    if a.vendor_accepted is None or a.org_accepted is None:
        side = "vendor" if a.vendor_accepted is None else "org"
        return f"agreement {a.id} terms not accepted by the {side}"
    if a.valid_from is not None and now < a.valid_from:
        return f"agreement {a.id} not yet valid"
    if a.valid_until is not None and now >= a.valid_until:
        return f"agreement {a.id} expired"
    if mode not in a.modes:
        return f"agreement {a.id} does not cover {mode}"
    return None


def decide(
    *,
    user: User,
    agent: Agent,
    mode: str,
    now: float,
    vendor_disabled: bool | None,
    agreements: Iterable[Agreement],
    grants: Iterable[str],
    org_disabled: bool = False,
) -> Decision:
    """May ``user`` open a ``mode`` session to ``agent``?"""
    if user.disabled:
        return deny("user disabled")
    if agent.disabled:
        return deny("agent disabled")
    if org_disabled:
        return deny(f"organisation {agent.org} disabled")
    if not agent.enrolled:
        return deny("agent not enrolled")
    if mode == "homeoffice":
        if user.kind != "employee":
            return deny("homeoffice is for employees")
        if user.org != agent.org:
            return deny("agent belongs to another organisation")
        if agent.id not in set(grants):
            return deny("agent is not granted to this employee")
        return Decision(True, "homeoffice grant")
    if mode not in ("access", "support"):
        return deny(f"unknown mode {mode}")
    if user.kind != "vendor" or user.vendor is None:
        return deny(f"{mode} is for vendor users")
    if vendor_disabled is None:
        return deny("vendor unknown")
    if vendor_disabled:
        return deny("vendor disabled")
    problems = []
    attended: Agreement | None = None
    for a in agreements:
        problem = _agreement_problem(a, mode, now)
        if problem is not None:
            problems.append(problem)
            continue
        if mode == "access" and a.unattended:
            return Decision(True, f"agreement {a.id} allows unattended access", agreement=a.id)
        attended = attended or a
    if attended is not None:
        return Decision(
            True,
            f"agreement {attended.id} requires approval",
            needs_approval=True,
            agreement=attended.id,
        )
    if not problems:
        return deny(f"no agreement between vendor {user.vendor} and org {agent.org}")
    return deny("; ".join(problems))


def source_allowed(networks: Iterable[str], address: str) -> bool:
    """True when ``address`` (``IP:PORT`` or ``[IPv6]:PORT``) lies in one of ``networks``.

    An empty list allows every source; an unparsable address is refused.
    """
    nets = list(networks)
    if not nets:
        return True
    host = address.rpartition(":")[0].strip("[]") or address
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(n, strict=False) for n in nets)
