"""Policy (gatewayd/policy.py): deny by default, and every decision says why."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import pytest

from gatewayd.policy import Decision, decide
from gatewayd.store import Agent, Agreement, User

NOW = 1_700_000_000.0
DAY = 86400.0

VENDOR_USER = User(
    "vera@acme", "vendor", vendor="acme", org=None, disabled=False, failures=0, locked_until=0
)
EMPLOYEE = User(
    "emil@clinic", "employee", vendor=None, org="clinic", disabled=False, failures=0, locked_until=0
)
AGENT = Agent(
    "pc-1",
    "clinic",
    disabled=False,
    enrolled=True,
    cert_fingerprint="ab" * 32,
    noise_key="k",
    token_expires=None,
    last_seen=NOW - 5,
)
AGREEMENT = Agreement(
    "acme-clinic",
    vendor="acme",
    org="clinic",
    modes=("access", "support"),
    unattended=False,
    valid_from=NOW - DAY,
    valid_until=NOW + DAY,
    state="active",
    vendor_accepted=NOW - 2 * DAY,
    org_accepted=NOW - 2 * DAY,
)


def check(
    mode: str,
    *,
    user: User = VENDOR_USER,
    agent: Agent = AGENT,
    agreements: Iterable[Agreement] = (AGREEMENT,),
    vendor_disabled: bool | None = False,
    grants: Iterable[str] = (),
    now: float = NOW,
) -> Decision:
    return decide(
        user=user,
        agent=agent,
        mode=mode,
        now=now,
        vendor_disabled=vendor_disabled,
        agreements=agreements,
        grants=grants,
    )


def denied(decision: Decision, reason: str) -> None:
    assert decision == Decision(False, reason)


# -- allowed -------------------------------------------------------------------------------


def test_access_unattended_is_allowed_without_approval() -> None:
    d = check("access", agreements=[replace(AGREEMENT, unattended=True)])
    assert d == Decision(
        True, "agreement acme-clinic allows unattended access", agreement="acme-clinic"
    )


def test_access_attended_needs_approval() -> None:
    d = check("access")
    assert d == Decision(
        True,
        "agreement acme-clinic requires approval",
        needs_approval=True,
        agreement="acme-clinic",
    )


def test_support_always_needs_approval() -> None:
    d = check("support", agreements=[replace(AGREEMENT, unattended=True)])
    assert d.allowed and d.needs_approval
    assert d.agreement == "acme-clinic"


def test_unattended_agreement_wins_over_attended_one() -> None:
    attended = replace(AGREEMENT, id="a-attended")
    unattended = replace(AGREEMENT, id="b-unattended", unattended=True)
    d = check("access", agreements=[attended, unattended])
    assert d.allowed and not d.needs_approval
    assert d.agreement == "b-unattended"


def test_one_usable_agreement_among_broken_ones_is_enough() -> None:
    expired = replace(AGREEMENT, id="old", valid_until=NOW - DAY)
    d = check("access", agreements=[expired, AGREEMENT])
    assert d.allowed and d.agreement == "acme-clinic"


def test_open_ended_agreement() -> None:
    d = check("support", agreements=[replace(AGREEMENT, valid_from=None, valid_until=None)])
    assert d.allowed


def test_validity_window_edges() -> None:
    start, end = AGREEMENT.valid_from, AGREEMENT.valid_until
    assert start is not None and end is not None
    assert check("access", now=start).allowed  # valid from its first second
    assert not check("access", now=start - 0.001).allowed
    assert check("access", now=end - 0.001).allowed
    assert not check("access", now=end).allowed  # and up to, not including, its end


def test_homeoffice_employee_with_grant() -> None:
    d = check("homeoffice", user=EMPLOYEE, agreements=[], vendor_disabled=None, grants={"pc-1"})
    assert d == Decision(True, "homeoffice grant")


# -- denied: the principals ------------------------------------------------------------------


def test_disabled_user() -> None:
    denied(check("access", user=replace(VENDOR_USER, disabled=True)), "user disabled")
    denied(
        check("homeoffice", user=replace(EMPLOYEE, disabled=True), grants={"pc-1"}),
        "user disabled",
    )


def test_disabled_agent() -> None:
    denied(check("access", agent=replace(AGENT, disabled=True)), "agent disabled")


def test_agent_not_enrolled() -> None:
    denied(check("access", agent=replace(AGENT, enrolled=False)), "agent not enrolled")
    denied(
        check("homeoffice", user=EMPLOYEE, agent=replace(AGENT, enrolled=False), grants={"pc-1"}),
        "agent not enrolled",
    )


def test_disabled_vendor() -> None:
    denied(check("access", vendor_disabled=True), "vendor disabled")
    denied(check("support", vendor_disabled=True), "vendor disabled")


def test_unknown_vendor() -> None:
    denied(check("access", vendor_disabled=None), "vendor unknown")


def test_unknown_mode() -> None:
    denied(check("admin"), "unknown mode admin")


# -- denied: agreements ------------------------------------------------------------------------


def test_vendor_user_without_agreement() -> None:
    denied(check("access", agreements=[]), "no agreement between vendor acme and org clinic")


def test_agreement_suspended() -> None:
    d = check("access", agreements=[replace(AGREEMENT, state="suspended")])
    denied(d, "agreement acme-clinic is suspended")


def test_agreement_not_accepted_by_vendor() -> None:
    d = check("access", agreements=[replace(AGREEMENT, vendor_accepted=None)])
    denied(d, "agreement acme-clinic terms not accepted by the vendor")


def test_agreement_not_accepted_by_org() -> None:
    d = check("access", agreements=[replace(AGREEMENT, org_accepted=None)])
    denied(d, "agreement acme-clinic terms not accepted by the org")


def test_agreement_accepted_by_neither_names_the_vendor_first() -> None:
    d = check("access", agreements=[replace(AGREEMENT, vendor_accepted=None, org_accepted=None)])
    denied(d, "agreement acme-clinic terms not accepted by the vendor")


def test_agreement_not_yet_valid() -> None:
    d = check("access", agreements=[replace(AGREEMENT, valid_from=NOW + 1)])
    denied(d, "agreement acme-clinic not yet valid")


def test_agreement_expired() -> None:
    d = check("access", agreements=[replace(AGREEMENT, valid_until=NOW - 1)])
    denied(d, "agreement acme-clinic expired")


@pytest.mark.parametrize(("modes", "mode"), [(("support",), "access"), (("access",), "support")])
def test_mode_not_covered(modes: tuple[str, ...], mode: str) -> None:
    d = check(mode, agreements=[replace(AGREEMENT, modes=modes, unattended=True)])
    denied(d, f"agreement acme-clinic does not cover {mode}")


def test_every_problem_is_reported() -> None:
    a = replace(AGREEMENT, id="a", state="suspended")
    b = replace(AGREEMENT, id="b", valid_until=NOW - 1)
    d = check("access", agreements=[a, b])
    denied(d, "agreement a is suspended; agreement b expired")


def test_suspension_is_checked_before_anything_else() -> None:
    a = replace(AGREEMENT, state="suspended", org_accepted=None, valid_until=NOW - 1, modes=())
    denied(check("access", agreements=[a]), "agreement acme-clinic is suspended")


# -- denied: who may use which mode --------------------------------------------------------


@pytest.mark.parametrize("mode", ["access", "support"])
def test_employee_is_denied_vendor_modes(mode: str) -> None:
    d = check(mode, user=EMPLOYEE, vendor_disabled=None, grants={"pc-1"})
    denied(d, f"{mode} is for vendor users")


def test_vendor_user_without_vendor_is_denied() -> None:
    d = check("access", user=replace(VENDOR_USER, vendor=None))
    denied(d, "access is for vendor users")


def test_vendor_user_is_denied_homeoffice() -> None:
    d = check("homeoffice", grants={"pc-1"})  # even with a grant
    denied(d, "homeoffice is for employees")


def test_homeoffice_employee_of_another_org() -> None:
    other = replace(EMPLOYEE, org="hospital")
    d = check("homeoffice", user=other, grants={"pc-1"})
    denied(d, "agent belongs to another organisation")


def test_homeoffice_without_grant() -> None:
    d = check("homeoffice", user=EMPLOYEE, grants={"pc-2"})
    denied(d, "agent is not granted to this employee")
    denied(check("homeoffice", user=EMPLOYEE, grants=[]), "agent is not granted to this employee")


def test_grants_may_be_any_iterable() -> None:
    d = check("homeoffice", user=EMPLOYEE, grants=iter(["pc-2", "pc-1"]))
    assert d.allowed


def test_agreements_may_be_a_generator() -> None:
    d = check("access", agreements=(a for a in [AGREEMENT]))
    assert d.allowed and d.needs_approval
