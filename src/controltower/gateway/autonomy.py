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

from typing import Literal

from controltower.gateway.tools import RISK_ORDER, ToolDefinition

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
