"""Sandbox tools for the refunds example (a real deployment points these at the payment API)."""

from __future__ import annotations

from typing import Any


def lookup_charge(payload: dict[str, Any]) -> dict[str, Any]:
    return {"ticket": payload["ticket"], "charges": [{"amount_cents": 4200}, {"amount_cents": 4200}]}


def issue_refund(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    # the idempotency key lets the payment provider drop a repeated request
    return {"refunded_cents": payload["amount_cents"], "idempotency_key": ctx.idempotency_key}
