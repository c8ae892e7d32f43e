"""ctx.memory inside runs, tenant isolation through the engine, and provenance of what an agent
read reaching the approval request and the audit trail."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from controltower.engine import EmbeddedEngine
from controltower.engine.context import StepContext
from controltower.gateway.approvals import Approver
from controltower.gateway.engine_gate import GovernedToolGate
from controltower.gateway.pipeline import open_gateway
from controltower.memory import Memory, MemoryUnavailable, bind_memory
from controltower.spec.models import WorkflowSpec

HERE = str(Path(__file__).parent / "wf")
POLICY = """
@id("refunds")
@approval("finance")
permit (principal in Workflow::"helpdesk", action == Action::"helpdesk.refund", resource);
"""
TOOLS = {"refund": {"impl": "memory_agents:refund", "side_effect": "irreversible", "risk": "high"}}


@pytest.fixture
async def governed(store_url: str) -> AsyncIterator[tuple[EmbeddedEngine, Any]]:
    engine = await EmbeddedEngine.open(store_url, poll_interval=0.05)
    gateway = await open_gateway(engine.store, policy_texts={"helpdesk.cedar": POLICY})
    engine.tool_gate = GovernedToolGate(gateway)
    yield engine, gateway
    await engine.close()


def agent_spec(step: str, impl: str) -> WorkflowSpec:
    return WorkflowSpec.model_validate(
        {
            "name": "helpdesk",
            "tools": TOOLS,
            "agents": {step: {"kind": "python", "impl": f"memory_agents:{impl}", "autonomy": "expanded"}},
            "governance": {"autonomy": "expanded"},
            "steps": [{"id": step, "kind": "agent", "agent": step, "input": "${{ input }}"}],
        }
    )


async def run_to_end(engine: EmbeddedEngine, spec: WorkflowSpec, data: dict[str, Any], tenant: str) -> Any:
    run_id = await engine.start(spec, data, tenant=tenant, base_dir=HERE)
    run = await engine.wait(run_id, timeout=10)
    assert run.status == "completed", run.error
    return run.output


async def test_steps_remember_and_recall_within_their_tenant(governed: Any) -> None:
    engine, _ = governed
    note = {"customer": "42", "note": "charged twice for the annual plan", "tier": "gold"}
    stored = await run_to_end(engine, agent_spec("remember", "remember"), note, tenant="acme")
    assert stored == {"stored": "customer:42", "tenant": "acme", "workflow": "helpdesk"}

    query = {"customer": "42", "complaint": "double charge on my plan"}
    mine = await run_to_end(engine, agent_spec("recall", "recall"), query, tenant="acme")
    assert mine["profile"] == {"text": "charged twice for the annual plan", "tier": "gold"}
    assert mine["similar"] == ["customer:42"]
    entry = await engine.memory.view("acme", "helpdesk").get_entry("customer:42")
    assert entry is not None
    # the step's own reads were recorded: the get, then the search hit
    assert [(r["source"], r["ref"], r["digest"], r.get("note", "")[:10]) for r in mine["reads"]] == [
        ("memory", "default/customer:42", entry.digest, ""),
        ("memory", "default/customer:42", entry.digest, "search hit"),
    ]

    theirs = await run_to_end(engine, agent_spec("recall", "recall"), query, tenant="globex")
    assert theirs == {"profile": None, "similar": [], "reads": []}


async def test_reads_reach_the_approval_request_and_the_audit_record(governed: Any) -> None:
    engine, gateway = governed
    # (tools declared in a spec are registered for the default tenant only, so this runs there)
    memory = engine.memory.view("default", "helpdesk")
    entry = await memory.put("customer:7", {"text": "loyal customer", "tier": "gold"})
    spec = agent_spec("resolve", "refund_with_context")
    run_id = await engine.start(spec, {"customer": "7", "ticket": "T-9"}, tenant="default", base_dir=HERE)
    await engine.wait(run_id, statuses=("waiting",), timeout=10)

    (request,) = await gateway.approvals.list(tenant="default")
    expected = [
        "policy:refunds-v3",  # given explicitly by the agent, first
        {"source": "memory", "ref": "default/customer:7", "digest": entry.digest},
        {"source": "helpdesk", "ref": "ticket/T-9", "digest": "sha256:feed", "note": "ticket body"},
    ]
    assert request.context["proposal"]["data_read"] == expected
    assert request.context["proposal"]["reasoning"] == "7 is a gold customer charged twice"
    # nothing is in the audit trail's provenance until the call is decided
    assert await gateway.audit.query("default", run_id=run_id, kind="data_read") == []

    await gateway.decide(request.id, approver=Approver("fiona", groups=("finance",)), approve=True)
    await engine.wake(run_id)
    run = await engine.wait(run_id, timeout=10)
    assert run.status == "completed", run.error
    assert run.output["refund"]["output"] == {"refunded": 1500, "ticket": "T-9"}

    (record,) = await gateway.audit.query("default", run_id=run_id, kind="data_read")
    assert record.subject == "helpdesk.refund"
    assert record.outcome == "ok"
    assert record.actor == "agent:resolve"
    assert record.data["data_read"] == expected
    (executed,) = [
        r
        for r in await gateway.audit.query("default", run_id=run_id, kind="tool_call")
        if r.outcome == "executed"
    ]
    assert record.data["call_key"].endswith(f"/{executed.data['step_key']}/{executed.data['call_index']}")
    assert (await gateway.audit.verify()).ok


async def test_memory_outside_a_run_needs_a_binding(sqlite_url: str) -> None:
    ctx = StepContext(run_id="r", step_key="s", step_id="s", workflow="wf", attempt=1, tenant="acme")
    with pytest.raises(MemoryUnavailable, match="no memory is bound"):
        _ = ctx.memory
    engine = await EmbeddedEngine.open(sqlite_url)
    try:
        bind_memory(Memory(engine.store))
        ctx = StepContext(run_id="r", step_key="s", step_id="s", workflow="wf", attempt=1, tenant="acme")
        await ctx.memory.put("k", "v")
        assert await ctx.memory.get("k") == "v"
        assert (ctx.memory.tenant, ctx.memory.workflow) == ("acme", "wf")
        assert len(ctx.reads) == 1
    finally:
        bind_memory(None)
        await engine.close()
