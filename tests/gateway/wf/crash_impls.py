"""Workflows, tools and policy for the gateway crash-replay tests and their worker processes.

Imported two ways: as ``gateway.wf.crash_impls`` (or ``tests.gateway.wf.crash_impls``) by the
tests and as ``wf.crash_impls`` by the worker subprocess and the tool resolver, whose
``sys.path`` holds ``tests/gateway`` (the workflows' ``base_dir``). Keep it free of relative
imports: the side effects it counts live in files, so every copy sees the same ledger.

Each tool appends ``pid idempotency_key amount`` to ``$TOWER_TEST_LEDGER/<tag>-<tool>``,
fsynced before it goes on. With ``TOWER_TEST_HANG=SECONDS`` it then hangs that long before
returning: a payment API that took the money and never answered.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from controltower.gateway.tools import ToolDefinition
from controltower.spec.models import WorkflowSpec

HERE = Path(__file__).resolve().parent.parent  # tests/gateway: the workflows' base_dir
WORKFLOW = "payments"
HANG_ENV = "TOWER_TEST_HANG"

POLICY = """
@id("payments-need-finance")
@approval("finance")
permit (principal in Workflow::"payments", action == Action::"payments.pay", resource);

@id("charges")
permit (
    principal in Workflow::"payments",
    action in [Action::"psp.charge", Action::"psp.charge_plain"],
    resource
);
"""


def ledger() -> Path:
    return Path(os.environ.get("TOWER_TEST_LEDGER", "/tmp/tower-test-ledger"))


def entries(tag: str, tool: str) -> list[tuple[int, str, int]]:
    """``(pid, idempotency_key, amount)`` per execution of ``tool`` for ``tag``, in order."""
    path = ledger() / f"{tag}-{tool}"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().split("\n")[:-1]:  # complete lines only: a writer may be mid-line
        pid, key, amount = line.split(" ")
        out.append((int(pid), key, int(amount)))
    return out


def _record(tag: str, tool: str, key: str, amount: int) -> None:
    ledger().mkdir(parents=True, exist_ok=True)
    with (ledger() / f"{tag}-{tool}").open("a") as f:
        f.write(f"{os.getpid()} {key} {amount}\n")
        f.flush()
        os.fsync(f.fileno())


async def _maybe_hang() -> None:
    seconds = os.environ.get(HANG_ENV)
    if seconds:
        await asyncio.sleep(float(seconds))


async def pay(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """An irreversible payment (not idempotent): running it twice pays twice."""
    _record(payload["tag"], "pay", ctx.idempotency_key, payload["amount_cents"])
    await _maybe_hang()
    return {"paid": payload["amount_cents"], "invoice": payload["invoice"], "by": "tool"}


async def charge(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """A card charge; the PSP de-duplicates by the idempotency key (when the tool says so)."""
    _record(payload["tag"], "charge", ctx.idempotency_key, payload["amount_cents"])
    await _maybe_hang()
    return {"charged": payload["amount_cents"], "key": ctx.idempotency_key}


def registry_tools() -> list[ToolDefinition]:
    """Registry tools (not workflow-local): the same definition is registered by every process."""
    schema = {"type": "object", "required": ["tag", "amount_cents"]}
    base: dict[str, Any] = {
        "owner": "payments",
        "input_schema": schema,
        "side_effect": "write",
        "risk": "medium",
        "source": "python",
    }
    return [
        ToolDefinition(
            name="psp.charge",
            description="charge a card; safe to retry with the same idempotency key",
            tags=("idempotent",),
            source_ref={"impl": "wf.crash_impls:charge", "base_dir": str(HERE)},
            **base,
        ),
        ToolDefinition(
            name="psp.charge_plain",
            description="charge a card through an API that does not de-duplicate",
            source_ref={"impl": "wf.crash_impls:charge", "base_dir": str(HERE)},
            **base,
        ),
    ]


def run_input(tag: str, amount_cents: int = 1250) -> dict[str, Any]:
    return {"tag": tag, "invoice": f"INV-{tag[:6]}", "amount_cents": amount_cents}


def build_spec(kind: str) -> WorkflowSpec:
    """``pay``: one approved irreversible payment. ``pay_twice``: two payments with the same
    arguments. ``charge`` / ``charge_plain``: one charge through a registry tool."""
    pay_input = {
        "tag": "${{ input.tag }}",
        "invoice": "${{ input.invoice }}",
        "amount_cents": "${{ input.amount_cents }}",
    }
    charge_input = {"tag": "${{ input.tag }}", "amount_cents": "${{ input.amount_cents }}"}
    steps: list[dict[str, Any]]
    if kind == "pay":
        steps = [{"id": "pay", "kind": "tool", "tool": "pay", "input": pay_input}]
        output: Any = {"paid": "${{ steps.pay.output }}"}
    elif kind == "pay_twice":
        steps = [
            {"id": "pay1", "kind": "tool", "tool": "pay", "input": pay_input},
            {"id": "pay2", "kind": "tool", "tool": "pay", "input": pay_input},
        ]
        output = {"first": "${{ steps.pay1.output }}", "second": "${{ steps.pay2.output }}"}
    elif kind in ("charge", "charge_plain"):
        steps = [{"id": "charge", "kind": "tool", "tool": f"psp.{kind}", "input": charge_input}]
        output = {"charged": "${{ steps.charge.output }}"}
    else:
        raise ValueError(f"unknown workflow kind {kind!r}")
    tools = {
        "pay": {
            "impl": "wf.crash_impls:pay",
            "side_effect": "irreversible",
            "risk": "high",
        }
    }
    return WorkflowSpec.model_validate(
        {
            "name": WORKFLOW,
            "tools": tools,
            "steps": steps,
            "output": output,
            "governance": {"autonomy": "expanded"},
        }
    )
