"""Access: whether a user may reach an agent in a mode now, from the directory.

:func:`gatewayd.policy.decide` is the rule; this reads what it needs from the store
(the user, the agent, their organisations, agreements and grants) at the moment of
asking, so a session's tunnels and a revalidation after an admin change see the
directory as it is then. The end-to-end handshake an agent's tunnels use, and
whether the config refuses the classic one, are decided here too.
"""

from __future__ import annotations

from . import policy
from .clock import Clock
from .config import Config, ConfigHolder
from .store import Store

NO_PQ_KEY = "no post-quantum key ([e2e] require_hybrid is on; enroll the agent again)"


class Access:
    def __init__(self, holder: ConfigHolder, store: Store, clock: Clock) -> None:
        self.holder = holder
        self.store = store
        self.clock = clock

    @property
    def config(self) -> Config:
        return self.holder.current

    async def decide(self, user_id: str, agent_id: str, mode: str) -> policy.Decision:
        user = await self.store.get_user(user_id)
        agent = await self.store.get_agent(agent_id)
        if user is None:
            return policy.deny("unknown user")
        if agent is None:
            return policy.deny(f"unknown agent {agent_id}")
        vendor_disabled = await self.store.vendor_disabled(user.vendor) if user.vendor else None
        agreements = (
            await self.store.agreements_between(user.vendor, agent.org) if user.vendor else []
        )
        return policy.decide(
            user=user,
            agent=agent,
            org_disabled=await self.store.org_disabled(agent.org),
            mode=mode,
            now=self.clock.now(),
            vendor_disabled=vendor_disabled,
            agreements=agreements,
            grants=await self.store.grants_of(user_id),
        )

    async def e2e(self, agent_id: str) -> str:
        """The end-to-end handshake of the agent's tunnels: ``hybrid`` for an agent with
        an ML-KEM key (it answers no other, and clients are given the key)."""
        agent = await self.store.get_agent(agent_id)
        return "hybrid" if agent is not None and agent.pq_key else "classic"

    async def classic_refused(self, agent_id: str) -> bool:
        """``[e2e] require_hybrid`` is on and the agent can only run the classic handshake."""
        return self.config.e2e.require_hybrid and await self.e2e(agent_id) == "classic"
