"""The record of model calls, driven directly through a step context on a real store."""

from __future__ import annotations

from typing import Any

import pytest
from tests.agents.helpers import CATEGORY, support_spec

from controltower.engine import EmbeddedEngine
from controltower.engine.agents import agent_call
from controltower.engine.context import StepContext
from controltower.models import ModelCallLog, override_models
from controltower.models.testing import ScriptedModel, output
from controltower.spec.errors import StepFailure
from controltower.store import SqlStore

AGENT = {"kind": "llm", "model": "openai:gpt-4o-mini", "output_schema": CATEGORY, "output_retries": 1}


def ctx_for(store: SqlStore, run_id: str, attempt: int = 1) -> StepContext:
    return StepContext(
        run_id=run_id, step_key="triage", step_id="triage", workflow="support", attempt=attempt, store=store
    )


async def test_a_replayed_step_is_answered_from_the_record(store: SqlStore) -> None:
    spec = support_spec({"triage": AGENT})
    call = agent_call(spec, "triage", None)
    model = ScriptedModel([output({"category": "nope"}), output({"category": "bug"})])
    with override_models(default=model):
        first = await call({"text": "crash"}, ctx_for(store, "run_a"))
        again = await call({"text": "crash"}, ctx_for(store, "run_a", attempt=2))
    assert first == again == {"category": "bug"}
    assert model.calls == 2  # the answer and one re-ask; the replay called nothing
    records = await ModelCallLog(store).list("run_a")
    assert [r.call_index for r in records] == [0, 1]
    assert "nope" in records[0].response
    assert "schema" in records[1].request  # the re-ask that was sent
    usage = await ModelCallLog(store).usage("run_a")
    assert usage.calls == 2
    assert usage.cost_micros == sum(r.cost_micros for r in records)
    # another tenant's view of the run is empty
    assert await ModelCallLog(store).list("run_a", tenant="acme") == []


async def test_a_different_step_or_run_calls_the_model(store: SqlStore) -> None:
    spec = support_spec({"triage": AGENT})
    call = agent_call(spec, "triage", None)
    model = ScriptedModel([output({"category": "bug"})] * 2)
    with override_models(default=model):
        await call({"text": "x"}, ctx_for(store, "run_b"))
        await call({"text": "x"}, ctx_for(store, "run_c"))
    assert model.calls == 2


async def test_without_a_gateway_an_llm_agent_still_runs(engine: EmbeddedEngine) -> None:
    model = ScriptedModel([output({"category": "billing"})])
    with override_models(default=model):
        run_id = await engine.start(support_spec({"triage": {**AGENT, "tools": []}}), {"text": "bill"})
        run = await engine.wait(run_id, timeout=20)
    assert run.status == "completed", run.error
    assert run.output == {"category": "billing"}


@pytest.mark.parametrize("schema", [{"type": "array", "items": {"type": "string"}}])
async def test_a_non_object_output_schema_is_wrapped_for_the_model(store: SqlStore, schema: Any) -> None:
    spec = support_spec({"triage": {**AGENT, "output_schema": schema}})
    model = ScriptedModel([output({"result": ["a", "b"]})])
    with override_models(default=model):
        out = await agent_call(spec, "triage", None)({"text": "x"}, ctx_for(store, "run_d"))
    assert out == ["a", "b"]


async def test_tools_without_a_gateway_are_refused_with_what_to_do(store: SqlStore) -> None:
    spec = support_spec({"triage": {**AGENT, "tools": ["lookup"]}})
    with (
        override_models(default=ScriptedModel([output({"category": "bug"})])),
        pytest.raises(StepFailure, match="no tool gateway"),
    ):
        await agent_call(spec, "triage", None)({"text": "x"}, ctx_for(store, "run_e"))
