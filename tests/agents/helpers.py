"""A governed engine (gateway with a small support policy) for the agent and model tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from controltower.engine import EmbeddedEngine
from controltower.gateway.engine_gate import GovernedToolGate
from controltower.gateway.pipeline import ToolGateway, open_gateway
from controltower.spec.models import WorkflowSpec

POLICY = """
@id("reads")
permit (principal in Workflow::"support", action in Action::"read", resource);

@id("refunds")
@approval("finance")
permit (principal in Workflow::"support", action == Action::"support.refund", resource);
"""
TOOLS: dict[str, Any] = {
    "lookup": {
        "impl": "tests.agents.agent_tools:lookup",
        "description": "Look a ticket up.",
        "input_schema": {
            "type": "object",
            "properties": {"ticket": {"type": "string"}, "tag": {"type": "string"}},
            "required": ["ticket"],
        },
    },
    "refund_all": {
        "impl": "tests.agents.agent_tools:refund_all",
        "side_effect": "irreversible",
        "risk": "high",
    },
    "refund": {
        "impl": "tests.agents.agent_tools:refund",
        "side_effect": "irreversible",
        "risk": "high",
        "input_schema": {
            "type": "object",
            "properties": {"amount_cents": {"type": "integer"}, "tag": {"type": "string"}},
            "required": ["amount_cents"],
        },
    },
}
CATEGORY = {
    "type": "object",
    "properties": {"category": {"enum": ["billing", "bug", "other"]}},
    "required": ["category"],
}


def support_spec(
    agents: dict[str, Any], steps: list[dict[str, Any]] | None = None, **extra: Any
) -> WorkflowSpec:
    steps = steps or [{"id": "triage", "kind": "agent", "agent": "triage", "input": "${{ input }}"}]
    return WorkflowSpec.model_validate(
        {"name": "support", "tools": TOOLS, "agents": agents, "steps": steps, **extra}
    )


@contextlib.asynccontextmanager
async def governed_engine(store_url: str) -> AsyncIterator[tuple[EmbeddedEngine, ToolGateway]]:
    engine = await EmbeddedEngine.open(store_url, poll_interval=0.05)
    gateway = await open_gateway(engine.store, policy_texts={"support.cedar": POLICY})
    engine.tool_gate = GovernedToolGate(gateway)
    yield engine, gateway
    await engine.close()
