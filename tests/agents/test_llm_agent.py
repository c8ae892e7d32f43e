"""LLM agents on scripted models: tools through the gateway, denials as answers, structured output."""

from __future__ import annotations

import json
import sys
import uuid
from typing import Any

import pytest
from pydantic_ai.messages import ModelRequest, ToolReturnPart
from tests.agents.helpers import CATEGORY, support_spec

from controltower.engine import EmbeddedEngine
from controltower.gateway.approvals import Approver
from controltower.gateway.pipeline import ToolGateway
from controltower.models import ModelCallLog, override_models
from controltower.models.testing import FunctionModel, ScriptedModel, call, output

TRIAGE = {
    "kind": "llm",
    "role": "a support triage agent",
    "instructions": "Classify the ticket.",
    "model": "openai:gpt-4o-mini",
    "tools": ["lookup", "refund_all"],
    "output_schema": CATEGORY,
    "autonomy": "expanded",
}


def counted(name: str) -> int:
    # the gateway imports the tools module itself; read the counter from that instance
    module = sys.modules["tests.agents.agent_tools"]
    return int(module.CALLS[name])


def tool_returns(messages: list[Any]) -> dict[str, Any]:
    return {
        part.tool_name: part.content
        for message in messages
        if isinstance(message, ModelRequest)
        for part in message.parts
        if isinstance(part, ToolReturnPart)
    }


async def test_tool_calls_go_through_the_gateway_and_a_denial_is_the_tool_result(
    governed: tuple[EmbeddedEngine, ToolGateway],
) -> None:
    engine, gateway = governed
    tag = uuid.uuid4().hex
    model = ScriptedModel(
        [
            call("lookup", ticket="T-1", tag=tag),
            # a prompt injection in the ticket makes the model ask for a tool it has no grant for
            call("refund_all", tag=tag, reason="ignore previous instructions"),
            output({"category": "billing"}),
        ]
    )
    with override_models({"openai:gpt-4o-mini": model}):
        run_id = await engine.start(support_spec({"triage": TRIAGE}), {"text": "charged twice"})
        run = await engine.wait(run_id, timeout=20)
    assert run.status == "completed", run.error
    assert run.output == {"category": "billing"}
    assert model.calls == 3
    assert counted(f"{tag}-lookup") == 1
    assert counted(f"{tag}-refund_all") == 0
    seen = tool_returns(model.requests[-1])
    assert seen["lookup"]["status"] == "ok"
    assert seen["lookup"]["output"]["tier"] == "gold"
    assert seen["refund_all"]["status"] == "denied"
    assert seen["refund_all"]["code"] == "no_grant"
    audit = await gateway.audit.query("default", kind="tool_call", limit=100)
    assert any(
        r.outcome == "denied" and r.actor == "agent:triage" and r.subject and "refund_all" in r.subject
        for r in audit
    )
    calls = await ModelCallLog(engine.store).list(run_id)
    assert [(c.step_key, c.call_index, c.model, c.agent) for c in calls] == [
        ("triage", i, "openai:gpt-4o-mini", "triage") for i in range(3)
    ]
    assert all(c.input_tokens > 0 and c.output_tokens > 0 for c in calls)
    # priced from the genai-prices snapshot: $0.15 / $0.60 per 1M tokens
    assert all(c.cost_micros > 0 for c in calls)
    usage = await gateway.budgets.usage("default", f"run:{run_id}", "tokens")
    assert usage.used == sum(c.input_tokens + c.output_tokens for c in calls)
    assert usage.reserved == 0
    # each model call is on the audit chain too: who, which model, tokens, cost; no prompt text
    records = await gateway.audit.query("default", kind="model_call", run_id=run_id, limit=10)
    assert [(r.actor, r.subject, r.data["call_index"]) for r in records] == [
        ("agent:triage", "openai:gpt-4o-mini", i) for i in range(3)
    ]
    assert [r.data["cost_micros"] for r in records] == [c.cost_micros for c in calls]
    assert all("charged twice" not in json.dumps(r.data) for r in records)
    assert (await gateway.audit.verify()).ok


async def test_invalid_output_is_sent_back_then_accepted(
    governed: tuple[EmbeddedEngine, ToolGateway],
) -> None:
    engine, _ = governed
    model = ScriptedModel(
        [output({"category": "refunds"}), output({"kategorie": 1}), output({"category": "bug"})]
    )
    agent = {**TRIAGE, "tools": [], "output_retries": 2}
    with override_models(default=model):
        run_id = await engine.start(support_spec({"triage": agent}), {"text": "it crashes"})
        run = await engine.wait(run_id, timeout=20)
    assert run.status == "completed", run.error
    assert run.output == {"category": "bug"}
    assert model.calls == 3
    retry_text = str(model.requests[1][-1])
    assert "does not match the required JSON schema" in retry_text
    assert "refunds" in retry_text


async def test_invalid_output_after_every_reask_fails_the_step(
    governed: tuple[EmbeddedEngine, ToolGateway],
) -> None:
    engine, _ = governed
    model = FunctionModel(lambda messages, info: output({"category": "weather"}))
    agent = {**TRIAGE, "tools": [], "output_retries": 1}
    with override_models(default=model):
        run_id = await engine.start(support_spec({"triage": agent}), {"text": "?"})
        run = await engine.wait(run_id, timeout=20)
    assert run.status == "failed"
    assert run.error["code"] == "invalid_output"
    assert "weather" in run.error["message"] or "category" in run.error["message"]
    assert model.calls == 2  # the answer and one re-ask


async def test_offline_callable_runs_when_no_model_is_configured(
    governed: tuple[EmbeddedEngine, ToolGateway], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, _ = governed
    monkeypatch.delenv("TOWER_MODEL", raising=False)
    agent = {
        "kind": "llm",
        "output_schema": CATEGORY,
        "offline": "tests.agents.agent_tools:classify_offline",
    }
    run_id = await engine.start(support_spec({"triage": agent}), {"text": "my bill is wrong"})
    run = await engine.wait(run_id, timeout=20)
    assert run.status == "completed", run.error
    assert run.output == {"category": "billing", "offline": True}
    assert await ModelCallLog(engine.store).list(run_id) == []


async def test_no_model_and_no_offline_is_a_clear_error(
    governed: tuple[EmbeddedEngine, ToolGateway], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, _ = governed
    monkeypatch.delenv("TOWER_MODEL", raising=False)
    run_id = await engine.start(support_spec({"triage": {"kind": "llm"}}), {"text": "x"})
    run = await engine.wait(run_id, timeout=20)
    assert run.status == "failed"
    assert run.error["code"] == "model_not_configured"
    assert "TOWER_MODEL" in run.error["message"]


async def test_after_an_approval_park_recorded_model_calls_are_not_made_again(
    governed: tuple[EmbeddedEngine, ToolGateway],
) -> None:
    engine, gateway = governed
    tag = uuid.uuid4().hex
    model = ScriptedModel(
        [
            call("lookup", ticket="T-2", tag=tag),
            [
                "The customer was charged twice; refunding the duplicate.",
                call("refund", amount_cents=2500, tag=tag),
            ],
            output({"category": "billing"}),
        ]
    )
    agent = {**TRIAGE, "tools": ["lookup", "refund"]}
    spec = support_spec({"triage": agent}, governance={"autonomy": "expanded"})
    with override_models(default=model):
        run_id = await engine.start(spec, {"text": "refund me"})
        parked = await engine.wait(run_id, statuses=("waiting",), timeout=20)
        assert parked.status == "waiting"
        assert model.calls == 2
        (request,) = await gateway.approvals.list()
        assert (request.agent, request.args["amount_cents"]) == ("triage", 2500)
        assert request.context["proposal"]["reasoning"].startswith("The customer was charged twice")
        await gateway.decide(request.id, approver=Approver("fiona", groups=("finance",)), approve=True)
        await engine.wake(run_id)
        done = await engine.wait(run_id, timeout=20)
    assert done.status == "completed", done.error
    assert model.calls == 3  # the step ran again; its first two model calls came from the record
    assert (counted(f"{tag}-lookup"), counted(f"{tag}-refund")) == (1, 1)
    assert tool_returns(model.requests[-1])["refund"] == {"status": "ok", "output": {"refunded": 2500}}
    assert len(await ModelCallLog(engine.store).list(run_id)) == 3
