"""Tools for the API tests' workflow (importable as ``api.impls`` from the tests directory)."""

from __future__ import annotations

from typing import Any


async def lookup(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    return {"account": payload.get("account", "A-1"), "tier": "gold"}


async def pay(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    return {"paid": payload["amount"], "to": payload.get("to")}
