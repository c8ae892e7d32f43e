"""Model calls charged to the budget ledger; fallback on budget cap, error and timeout."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic_ai.exceptions import ModelHTTPError
from tests.agents.helpers import CATEGORY, support_spec

from controltower.engine import EmbeddedEngine
from controltower.gateway.pipeline import ToolGateway
from controltower.models import ModelCallLog, override_models
from controltower.models.testing import FunctionModel, ScriptedModel, output

PRIMARY, CHEAP = "openai:gpt-4o-mini", "ollama:llama3.2"


def triage(**extra: Any) -> dict[str, Any]:
    return {"kind": "llm", "model": PRIMARY, "output_schema": CATEGORY, **extra}


async def run(engine: EmbeddedEngine, spec: Any) -> Any:
    run_id = await engine.start(spec, {"text": "charged twice"})
    return await engine.wait(run_id, timeout=20)


async def test_budget_cap_falls_back_to_the_cheaper_model(
    governed: tuple[EmbeddedEngine, ToolGateway],
) -> None:
    engine, gateway = governed
    primary = ScriptedModel([output({"category": "bug"})])
    cheap = ScriptedModel([output({"category": "billing"})])
    spec = support_spec(
        {"triage": triage()},
        budget={"max_cost_usd": "0.000010", "on_exceed": "fallback", "fallback_model": CHEAP},
    )
    with override_models({PRIMARY: primary, CHEAP: cheap}):
        done = await run(engine, spec)
    assert done.status == "completed", done.error
    assert done.output == {"category": "billing"}
    assert (primary.calls, cheap.calls) == (0, 1)
    (record,) = await ModelCallLog(engine.store).list(done.id)
    assert record.model == CHEAP
    assert record.cost_micros == 0  # a local model
    assert record.attempts is not None
    assert record.attempts[0]["model"] == PRIMARY
    assert record.attempts[0]["error"] == "budget_exceeded"
    micros = await gateway.budgets.usage("default", f"run:{done.id}", "micros")
    assert (micros.cap, micros.used, micros.reserved) == (10, 0, 0)


async def test_budget_cap_with_stop_fails_the_step_without_calling_the_model(
    governed: tuple[EmbeddedEngine, ToolGateway],
) -> None:
    engine, gateway = governed
    primary = ScriptedModel([output({"category": "bug"})])
    spec = support_spec({"triage": triage()}, budget={"max_tokens": 50})
    with override_models({PRIMARY: primary}):
        done = await run(engine, spec)
    assert done.status == "failed"
    assert done.error["code"] == "budget_exceeded"
    assert primary.calls == 0
    tokens = await gateway.budgets.usage("default", f"run:{done.id}", "tokens")
    assert (tokens.cap, tokens.used, tokens.reserved) == (50, 0, 0)


async def test_tokens_and_cost_are_charged_up_the_scopes(
    governed: tuple[EmbeddedEngine, ToolGateway],
) -> None:
    engine, gateway = governed
    model = ScriptedModel([output({"category": "bug"})], usage=(1_000, 200))
    spec = support_spec(
        {"triage": triage()},
        owner={"team": "care"},
        model_prices={PRIMARY: {"input": 2_000_000, "output": 10_000_000}},  # $2 / $10 per 1M
    )
    with override_models({PRIMARY: model}):
        done = await run(engine, spec)
    assert done.status == "completed", done.error
    (record,) = await ModelCallLog(engine.store).list(done.id)
    assert (record.input_tokens, record.output_tokens) == (1_000, 200)
    assert record.cost_micros == 2_000 + 2_000  # 1000 * $2/1M + 200 * $10/1M = $0.004
    for scope in (f"run:{done.id}", "workflow:support", "department:care", "tenant:default"):
        micros = await gateway.budgets.usage("default", scope, "micros")
        tokens = await gateway.budgets.usage("default", scope, "tokens")
        assert (micros.used, micros.reserved) == (4_000, 0), scope
        assert tokens.used == 1_200, scope


async def test_an_agent_budget_caps_that_agent(governed: tuple[EmbeddedEngine, ToolGateway]) -> None:
    engine, _ = governed
    model = ScriptedModel([output({"category": "bug"})])
    spec = support_spec({"triage": triage(budget={"max_tokens": 10})})
    with override_models({PRIMARY: model}):
        done = await run(engine, spec)
    assert done.status == "failed"
    assert done.error["code"] == "budget_exceeded"
    assert "agent:triage" in done.error["message"]


async def test_an_error_falls_back_to_the_next_model(governed: tuple[EmbeddedEngine, ToolGateway]) -> None:
    engine, _ = governed

    def broken(messages: Any, info: Any) -> Any:
        raise ModelHTTPError(503, PRIMARY, {"error": "overloaded"})

    primary = FunctionModel(broken)
    cheap = ScriptedModel([output({"category": "other"})])
    with override_models({PRIMARY: primary, CHEAP: cheap}):
        done = await run(engine, support_spec({"triage": triage(fallback_models=[CHEAP])}))
    assert done.status == "completed", done.error
    assert done.output == {"category": "other"}
    assert (primary.calls, cheap.calls) == (1, 1)
    (record,) = await ModelCallLog(engine.store).list(done.id)
    assert record.model == CHEAP
    assert record.attempts is not None
    assert record.attempts[0]["model"] == PRIMARY


async def test_a_timeout_falls_back_and_a_dead_chain_fails_retryably(
    governed: tuple[EmbeddedEngine, ToolGateway],
) -> None:
    engine, _ = governed

    async def slow(messages: Any, info: Any) -> Any:
        await asyncio.sleep(5)
        return output({"category": "bug"})

    primary = FunctionModel(slow)
    cheap = ScriptedModel([output({"category": "billing"})])
    with override_models({PRIMARY: primary, CHEAP: cheap}):
        done = await run(engine, support_spec({"triage": triage(fallback_models=[CHEAP], timeout="200ms")}))
    assert done.status == "completed", done.error
    assert done.output == {"category": "billing"}

    with override_models({PRIMARY: FunctionModel(slow)}):
        done = await run(engine, support_spec({"triage": triage(timeout="100ms")}))
    assert done.status == "failed"
    assert done.error["code"] == "model_unavailable"
    assert "timed out" in done.error["message"]
