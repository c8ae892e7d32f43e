"""Autonomy levels: how much an agent may do without a human, on top of what policy allows.

A level can only tighten a policy decision, never loosen it:

=====================  ======================================================
draft_only             reads run; every write is recorded as a proposal, not executed
approve_writes         reads run; every write waits for approval
autonomous_low_risk    writes at or below the risk threshold run; the rest wait;
                       irreversible writes always wait
expanded               whatever policy allows runs
=====================  ======================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from controltower.gateway.tools import RISK_ORDER, ToolDefinition
from controltower.spec.errors import TowerError

if TYPE_CHECKING:
    from controltower.gateway.monitor import Controls

AutonomyLevel = Literal["draft_only", "approve_writes", "autonomous_low_risk", "expanded"]
LEVELS: tuple[str, ...] = ("draft_only", "approve_writes", "autonomous_low_risk", "expanded")
Effect = Literal["allow", "deny", "require_approval", "draft"]


def tighten(
    effect: Effect, tool: ToolDefinition, level: str, *, risk_threshold: str = "low"
) -> tuple[Effect, str | None]:
    """Combine a policy effect with an autonomy level; returns the effect and why it changed."""
    if effect == "deny" or not tool.writes:
        return effect, None
    if level == "draft_only":
        return "draft", f"autonomy level draft_only: {tool.side_effect} tools are proposed, not executed"
    if effect == "require_approval" or level == "expanded":
        return effect, None
    if level == "approve_writes":
        return "require_approval", "autonomy level approve_writes: every write needs approval"
    if level == "autonomous_low_risk":
        if tool.side_effect == "irreversible":
            return (
                "require_approval",
                "autonomy level autonomous_low_risk: irreversible actions need approval",
            )
        if RISK_ORDER[tool.risk] > RISK_ORDER[risk_threshold]:
            return (
                "require_approval",
                f"autonomy level autonomous_low_risk: risk {tool.risk} is above {risk_threshold}",
            )
        return effect, None
    return "deny", f"unknown autonomy level {level!r}"


def stricter(a: str, b: str) -> str:
    """The tighter of two levels (workflow and agent settings combine this way)."""
    return a if LEVELS.index(a) <= LEVELS.index(b) else b


def is_tightening(current: str, new: str) -> bool:
    return LEVELS.index(new) < LEVELS.index(current)


class AutonomyChangeError(TowerError):
    code = "autonomy_change_refused"


@dataclass(frozen=True, slots=True)
class AutonomyChange:
    scope: str
    level: str
    status: str  # applied | pending
    requested_by: str
    reason: str


class AutonomySettings:
    """Per-workflow and per-agent level overrides, changed under four eyes.

    Tightening applies at once (it can only make things safer); loosening is a pending
    change until a second person approves it. Every step is a ``control`` audit record.
    Scopes: ``workflow:<name>`` and ``agent:<workflow>/<agent>``.
    """

    KEY, PENDING = "autonomy", "autonomy_pending"

    def __init__(self, controls: Controls) -> None:
        self.controls = controls

    async def level(self, tenant: str, scope: str) -> str | None:
        value = await self.controls.get_value(tenant, scope, self.KEY)
        return value if isinstance(value, str) else None

    async def effective(
        self,
        tenant: str,
        workflow: str | None,
        agent: str | None,
        workflow_level: str,
        agent_level: str | None,
    ) -> str:
        """The level a call runs at: overrides replace spec levels; an agent never exceeds its workflow."""
        level = workflow_level
        if workflow:
            level = await self.level(tenant, f"workflow:{workflow}") or level
            if agent:
                own = await self.level(tenant, f"agent:{workflow}/{agent}") or agent_level or level
                level = stricter(level, own)
        return level

    async def request(
        self, tenant: str, scope: str, level: str, *, by: str, reason: str, current: str
    ) -> AutonomyChange:
        if level not in LEVELS:
            raise AutonomyChangeError(f"unknown autonomy level {level!r}", hint="one of " + ", ".join(LEVELS))
        if not reason.strip():
            raise AutonomyChangeError("a change of autonomy needs a reason")
        now_level = await self.level(tenant, scope) or current
        if is_tightening(now_level, level) or now_level == level:
            await self.controls.set_value(tenant, scope, self.KEY, level, reason, by)
            await self.controls.set_value(tenant, scope, self.PENDING, None, "superseded", by)
            return AutonomyChange(scope, level, "applied", by, reason)
        pending = {"level": level, "by": by, "reason": reason}
        await self.controls.set_value(tenant, scope, self.PENDING, pending, reason, by)
        return AutonomyChange(scope, level, "pending", by, reason)

    async def approve(self, tenant: str, scope: str, *, by: str) -> AutonomyChange:
        pending = await self.controls.get_value(tenant, scope, self.PENDING)
        if not isinstance(pending, dict):
            raise AutonomyChangeError(f"no autonomy change is pending for {scope}")
        if pending["by"] == by:
            raise AutonomyChangeError(
                "the person who asked for more autonomy cannot approve it", hint="another admin must approve"
            )
        reason = f"approved {pending['level']} asked by {pending['by']}: {pending['reason']}"
        await self.controls.set_value(tenant, scope, self.KEY, pending["level"], reason, by)
        await self.controls.set_value(tenant, scope, self.PENDING, None, "approved", by)
        return AutonomyChange(scope, pending["level"], "applied", pending["by"], pending["reason"])
