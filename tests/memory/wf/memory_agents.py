"""Agents and tools for the memory tests: they remember, recall, and act on what they recalled."""

from __future__ import annotations

from typing import Any

from controltower.engine.context import StepContext


async def remember(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    customer = payload["customer"]
    entry = await ctx.memory.put(
        f"customer:{customer}",
        {"text": payload["note"], "tier": payload["tier"]},
        subjects=[f"customer:{customer}"],
    )
    return {"stored": entry.key, "tenant": entry.tenant, "workflow": entry.workflow}


async def recall(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    profile = await ctx.memory.get(f"customer:{payload['customer']}")
    hits = await ctx.memory.search(payload["complaint"], k=3)
    return {"profile": profile, "similar": [h.entry.key for h in hits], "reads": ctx.reads}


async def refund_with_context(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Reads the customer's memory and the ticket, then proposes a refund that needs approval."""
    profile = await ctx.memory.get(f"customer:{payload['customer']}")
    ctx.record_read("helpdesk", f"ticket/{payload['ticket']}", digest="sha256:feed", note="ticket body")
    refund = await ctx.call_tool(
        "refund",
        {"ticket": payload["ticket"], "amount_cents": 1500},
        reasoning=f"{payload['customer']} is a {profile['tier']} customer charged twice",
        data_read=["policy:refunds-v3"],
    )
    return {"refund": refund}


async def refund(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    return {"refunded": payload["amount_cents"], "ticket": payload["ticket"]}
