"""Tools and offline agents for the agent tests; side effects counted in memory per tag."""

from __future__ import annotations

from collections import Counter
from typing import Any

CALLS: Counter[str] = Counter()


async def lookup(payload: dict[str, Any]) -> dict[str, Any]:
    CALLS[f"{payload.get('tag')}-lookup"] += 1
    return {"ticket": payload["ticket"], "tier": "gold", "note": "customer charged twice"}


async def refund_all(payload: dict[str, Any]) -> dict[str, Any]:
    CALLS[f"{payload.get('tag')}-refund_all"] += 1
    return {"refunded": "everything"}


async def refund(payload: dict[str, Any]) -> dict[str, Any]:
    CALLS[f"{payload.get('tag')}-refund"] += 1
    return {"refunded": payload["amount_cents"]}


def classify_offline(payload: dict[str, Any]) -> dict[str, Any]:
    text = str(payload.get("text", "")).lower()
    return {"category": "billing" if "charge" in text or "bill" in text else "other", "offline": True}


async def crash(payload: dict[str, Any]) -> dict[str, Any]:
    """Kills its own process (SIGKILL) when LLM_CRASH=1: a crash after model calls committed."""
    import os
    import signal

    if os.environ.get("LLM_CRASH") == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return {"survived": True}
