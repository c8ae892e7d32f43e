"""Workflows through the gateway: tool steps and agents' tool calls are governed end to end."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from controltower.engine import EmbeddedEngine
from controltower.gateway.approvals import Approver, NotAllowedToApprove
from controltower.gateway.engine_gate import GovernedToolGate
from controltower.gateway.pipeline import open_gateway
from controltower.spec.models import WorkflowSpec

from .wf import impls

HERE = str(Path(__file__).parent)
POLICY = """
@id("reads")
permit (principal in Workflow::"helpdesk", action in Action::"read", resource);

@id("replies")
permit (principal in Workflow::"helpdesk", action == Action::"helpdesk.send_reply", resource);

@id("refunds")
@approval("finance")
permit (principal in Workflow::"helpdesk", action == Action::"helpdesk.refund", resource);
"""
TOOLS = {
    "lookup": {"impl": "wf.impls:lookup"},
    "send_reply": {"impl": "wf.impls:send_reply", "side_effect": "write"},
    "refund": {"impl": "wf.impls:refund", "side_effect": "irreversible", "risk": "high"},
    "refund_all": {"impl": "wf.impls:refund", "side_effect": "irreversible", "risk": "high"},
}


@pytest.fixture
async def governed(store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    monkeypatch.setenv("TOWER_TEST_LEDGER", str(tmp_path / "ledger"))
    engine = await EmbeddedEngine.open(store_url, poll_interval=0.05)
    gateway = await open_gateway(engine.store, policy_texts={"helpdesk.cedar": POLICY})
    engine.tool_gate = GovernedToolGate(gateway)
    yield engine, gateway
    await engine.close()


def spec(steps: list[dict[str, Any]], **extra: Any) -> WorkflowSpec:
    return WorkflowSpec.model_validate({"name": "helpdesk", "tools": TOOLS, "steps": steps, **extra})


async def test_tool_steps_wait_for_approval_and_run_once(governed: Any) -> None:
    engine, gateway = governed
    tag = uuid.uuid4().hex
    wf = spec(
        [
            {"id": "find", "kind": "tool", "tool": "lookup", "input": {"tag": tag, "ticket": "T-1"}},
            {"id": "reply", "kind": "tool", "tool": "send_reply", "input": {"tag": tag, "ticket": "T-1"}},
            {
                "id": "refund",
                "kind": "tool",
                "tool": "refund",
                "input": {"tag": tag, "ticket": "T-1", "amount_cents": 1200},
            },
        ],
        governance={"autonomy": "autonomous_low_risk"},
    )
    run_id = await engine.start(wf, base_dir=HERE)
    run = await engine.wait(run_id, statuses=("waiting",), timeout=10)
    assert run.status == "waiting"
    inbox = await gateway.approvals.list()
    assert [(a.tool, a.approval_group, a.args["amount_cents"]) for a in inbox] == [
        ("helpdesk.refund", "finance", 1200)
    ]
    assert (impls.count(f"{tag}-lookup"), impls.count(f"{tag}-send"), impls.count(f"{tag}-refund")) == (
        1,
        1,
        0,
    )
    await gateway.decide(inbox[0].id, approver=Approver("fiona", groups=("finance",)), approve=True)
    await engine.wake(run_id)
    run = await engine.wait(run_id, timeout=10)
    assert run.status == "completed", run.error
    assert run.output == {"refunded": 1200}
    assert (impls.count(f"{tag}-lookup"), impls.count(f"{tag}-send"), impls.count(f"{tag}-refund")) == (
        1,
        1,
        1,
    )
    assert (await gateway.audit.verify()).ok


async def test_a_denied_tool_step_fails_with_the_gateway_code(governed: Any) -> None:
    engine, _ = governed
    wf = spec([{"id": "x", "kind": "tool", "tool": "send_reply", "input": {"tag": "t", "ticket": "T"}}])
    run_id = await engine.start(wf, base_dir=HERE)
    run = await engine.wait(run_id, statuses=("waiting", "completed", "failed"), timeout=10)
    # approve_writes is the default autonomy: the write waits instead of running
    assert run.status == "waiting"
    rejected = (await engine.tool_gate.gateway.approvals.list())[0]
    await engine.tool_gate.gateway.decide(
        rejected.id, approver=Approver("ada", "admin"), approve=False, reason="tone is off"
    )
    await engine.wake(run_id)
    run = await engine.wait(run_id, timeout=10)
    assert run.status == "failed"
    assert run.error["code"] == "rejected"
    assert "tone is off" in run.error["message"]


async def test_autonomy_approvals_go_to_the_governance_group(governed: Any) -> None:
    """An approval the autonomy level asks for names the workflow's approval group."""
    engine, gateway = governed
    wf = spec(
        [{"id": "x", "kind": "tool", "tool": "send_reply", "input": {"tag": "g", "ticket": "T"}}],
        governance={"autonomy": "approve_writes", "approval_group": "support-leads"},
    )
    run_id = await engine.start(wf, base_dir=HERE)
    await engine.wait(run_id, statuses=("waiting",), timeout=10)
    (request,) = await gateway.approvals.list()
    assert request.approval_group == "support-leads"
    with pytest.raises(NotAllowedToApprove):
        await gateway.decide(request.id, approver=Approver("bob", groups=("finance",)), approve=True)
    await gateway.decide(request.id, approver=Approver("sam", groups=("support-leads",)), approve=True)
    await engine.wake(run_id)
    assert (await engine.wait(run_id, timeout=10)).status == "completed"


async def test_spec_tools_work_in_any_tenant(governed: Any) -> None:
    """A workflow's own tools resolve in the tenant of the run, not only in "default"."""
    engine, gateway = governed
    tag = uuid.uuid4().hex
    wf = spec(
        [{"id": "find", "kind": "tool", "tool": "lookup", "input": {"tag": tag, "ticket": "T-9"}}],
        governance={"autonomy": "approve_writes"},
    )
    run_id = await engine.start(wf, base_dir=HERE, tenant="acme")
    run = await engine.wait(run_id, timeout=10)
    assert run.status == "completed", run.error
    assert "helpdesk.lookup" in await gateway.registry.names(tenant="acme")
    records = await gateway.audit.query(tenant="acme")
    assert [(r.kind, r.outcome) for r in records] == [("tool_call", "executed")]
    assert await gateway.audit.query(tenant="default") == []


async def test_agent_sees_denials_and_waits_for_approval(governed: Any) -> None:
    engine, gateway = governed
    tag = uuid.uuid4().hex
    wf = spec(
        [{"id": "work", "kind": "agent", "agent": "worker", "input": {"tag": tag, "ticket": "T-7"}}],
        agents={
            "worker": {
                "kind": "python",
                "impl": "wf.impls:agent_with_tools",
                "autonomy": "expanded",
            }
        },
        governance={"autonomy": "expanded"},
    )
    run_id = await engine.start(wf, base_dir=HERE)
    await engine.wait(run_id, statuses=("waiting",), timeout=10)
    (request,) = await gateway.approvals.list()
    assert request.agent == "worker"
    assert request.context["proposal"] == {"reasoning": "customer was charged twice"}
    await gateway.decide(request.id, approver=Approver("fiona", groups=("finance",)), approve=True)
    await engine.wake(run_id)
    run = await engine.wait(run_id, timeout=10)
    assert run.status == "completed", run.error
    assert run.output["found"]["status"] == "ok"
    assert run.output["probe"]["status"] == "denied"
    assert run.output["probe"]["code"] == "no_grant"
    assert run.output["refund"] == {"status": "ok", "output": {"refunded": 2500}}
    # the agent ran twice (before and after the approval); each side effect ran once
    assert impls.count(f"{tag}-lookup") == 1
    assert impls.count(f"{tag}-refund") == 1
    denied = await gateway.audit.query("default", kind="tool_call", limit=100)
    assert any(r.outcome == "denied" and r.actor == "agent:worker" for r in denied)
