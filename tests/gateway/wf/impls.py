"""Tools and agents for the governed-workflow tests; side effects counted per tag (a file, so
counts survive a killed process)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from controltower.engine.context import StepContext


def ledger() -> Path:
    return Path(os.environ.get("TOWER_TEST_LEDGER", "/tmp/tower-test-ledger"))


def count(name: str) -> int:
    path = ledger() / name
    return len(path.read_text().splitlines()) if path.exists() else 0


def _record(name: str, line: str) -> None:
    ledger().mkdir(parents=True, exist_ok=True)
    with (ledger() / name).open("a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


async def lookup(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    _record(f"{payload['tag']}-lookup", ctx.idempotency_key)
    return {"ticket": payload["ticket"], "tier": "gold"}


async def send_reply(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    _record(f"{payload['tag']}-send", ctx.idempotency_key)
    return {"sent": True, "ticket": payload["ticket"]}


async def refund(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    _record(f"{payload['tag']}-refund", f"{ctx.idempotency_key} {payload['amount_cents']}")
    return {"refunded": payload["amount_cents"]}


async def agent_with_tools(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Reads a ticket, tries a tool it has no grant for, then proposes a refund."""
    found = await ctx.call_tool("lookup", {"tag": payload["tag"], "ticket": payload["ticket"]})
    probe = await ctx.call_tool("refund_all", {"tag": payload["tag"]})
    refund = await ctx.call_tool(
        "refund",
        {"tag": payload["tag"], "ticket": payload["ticket"], "amount_cents": 2_500},
        reasoning="customer was charged twice",
    )
    return {"found": found, "probe": probe, "refund": refund}
