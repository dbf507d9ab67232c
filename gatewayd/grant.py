"""Homeoffice grants: which agents are an employee's dedicated equipment (``gw admin grant``).

``homeoffice`` lets an employee reach only the agents granted to them, and only agents
of their own organisation (:func:`gatewayd.policy.decide`). An administrator grants
with ``gw admin grant add USER AGENT`` and takes back with ``gw admin grant remove``;
both are audited as ``admin.change`` (ops ``grant.add``, ``grant.remove``). A grant
to someone who is not an employee of the agent's organisation is refused here, so the
mistake shows when it is made rather than at the employee's first login.
"""

from __future__ import annotations

from typing import Any

from .operation import Admin, AdminError, arg_id


async def grant_add(s: Admin, args: dict[str, Any], by: str) -> Any:
    user_id = arg_id(args, "user")
    agent_id = arg_id(args, "agent")
    user = await s.store.get_user(user_id)
    agent = await s.store.get_agent(agent_id)
    if user is None:
        raise AdminError(f"no user {user_id!r}")
    if agent is None:
        raise AdminError(f"no agent {agent_id!r}")
    if user.kind != "employee" or user.org != agent.org:
        raise AdminError(
            f"{user_id} is not an employee of {agent.org}, which owns {agent_id}: "
            "homeoffice is for an organisation's own employees"
        )
    await s.store.add_grant(user_id, agent_id, s.now())
    await s.changed(by, "grant.add", user=user_id, agent=agent_id, org=agent.org)
    return {"user": user_id, "agent": agent_id}


async def grant_remove(s: Admin, args: dict[str, Any], by: str) -> Any:
    user_id = arg_id(args, "user")
    agent_id = arg_id(args, "agent")
    if not await s.store.remove_grant(user_id, agent_id):
        raise AdminError(f"{agent_id} is not granted to {user_id}")
    await s.changed(by, "grant.remove", user=user_id, agent=agent_id)
    ended = await s.broker.revalidate(f"grant.remove by {by}")
    return {"user": user_id, "agent": agent_id, "sessions_ended": ended}
