"""The real pydantic-ai OpenAI client path against an OpenAI-compatible server on loopback."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic_ai.models import override_allow_model_requests
from tests.agents.helpers import CATEGORY, support_spec
from tests.models.openai_server import FakeOpenAI

from controltower.engine import EmbeddedEngine
from controltower.gateway.pipeline import ToolGateway
from controltower.models import ModelCallLog
from controltower.models.registry import clear_cache

SECRET = "sk-test-" + uuid.uuid4().hex


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    tag = uuid.uuid4().hex
    with FakeOpenAI({"ticket": "T-5", "tag": tag}, {"category": "billing"}) as fake:
        monkeypatch.setenv("TOWER_MODEL_BASE_URL", fake.base_url)
        monkeypatch.setenv("TOWER_MODEL_API_KEY", SECRET)
        monkeypatch.setenv("OPENAI_BASE_URL", fake.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", SECRET)
        monkeypatch.delenv("TOWER_MODEL", raising=False)
        clear_cache()
        with override_allow_model_requests(True):  # only to this loopback server
            yield fake
    clear_cache()


@pytest.mark.parametrize("model", ["openai-compatible:tiny-llm", "openai:gpt-4o-mini"])
async def test_chat_completions_with_a_tool_call_and_structured_output(
    server: FakeOpenAI, governed_sqlite: tuple[EmbeddedEngine, ToolGateway], model: str
) -> None:
    engine, gateway = governed_sqlite
    agent = {
        "kind": "llm",
        "model": model,
        "tools": ["lookup"],
        "output_schema": CATEGORY,
        "autonomy": "expanded",
        "max_tokens": 256,
    }
    run_id = await engine.start(support_spec({"triage": agent}), {"text": "charged twice"})
    run = await engine.wait(run_id, timeout=30)
    assert run.status == "completed", run.error
    assert run.output == {"category": "billing"}

    first, second = server.requests
    assert first["model"] == model.split(":", 1)[1]
    assert [t["function"]["name"] for t in first["tools"]] == ["lookup", "final_result"]
    assert first["tools"][0]["function"]["parameters"]["required"] == ["ticket"]
    assert "charged twice" in json.dumps(first["messages"])
    tool_message = next(m for m in second["messages"] if m["role"] == "tool")
    assert json.loads(tool_message["content"])["status"] == "ok"
    assert all(h["authorization"] == f"Bearer {SECRET}" for h in server.headers)

    calls = await ModelCallLog(engine.store).list(run_id)
    assert [(c.model, c.input_tokens, c.output_tokens) for c in calls] == [(model, 120, 30)] * 2
    everything: list[Any] = [c.request + c.response + json.dumps(c.attempts) for c in calls]
    assert not any(SECRET in text or server.base_url in text for text in everything)
    audit = await gateway.audit.query("default", kind="tool_call", limit=10)
    assert any(r.actor == "agent:triage" and r.outcome == "executed" for r in audit)


async def test_a_server_error_is_a_retryable_model_unavailable(
    server: FakeOpenAI, governed_sqlite: tuple[EmbeddedEngine, ToolGateway], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, _ = governed_sqlite
    server.fail_next = 100
    agent = {"kind": "llm", "model": "openai-compatible:tiny-llm", "output_schema": CATEGORY, "timeout": "5s"}
    run_id = await engine.start(support_spec({"triage": agent}), {"text": "x"})
    run = await engine.wait(run_id, timeout=60)
    assert run.status == "failed"
    assert run.error["code"] == "model_unavailable"
    assert SECRET not in json.dumps(run.error)


async def test_openai_compatible_without_a_base_url_says_what_to_set(
    governed_sqlite: tuple[EmbeddedEngine, ToolGateway], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, _ = governed_sqlite
    monkeypatch.delenv("TOWER_MODEL_BASE_URL", raising=False)
    clear_cache()
    agent = {"kind": "llm", "model": "openai-compatible:tiny-llm"}
    run_id = await engine.start(support_spec({"triage": agent}), {"text": "x"})
    run = await engine.wait(run_id, timeout=30)
    assert run.status == "failed"
    assert run.error["code"] == "model_config"
    assert "TOWER_MODEL_BASE_URL" in run.error["message"]


async def test_without_the_opt_in_no_request_leaves_the_process(
    server: FakeOpenAI, governed_sqlite: tuple[EmbeddedEngine, ToolGateway]
) -> None:
    engine, _ = governed_sqlite
    with override_allow_model_requests(False):
        agent = {"kind": "llm", "model": "openai-compatible:tiny-llm"}
        run_id = await engine.start(support_spec({"triage": agent}), {"text": "x"})
        run = await engine.wait(run_id, timeout=30)
    assert run.status == "failed"
    assert "not allowed" in run.error["message"].lower()
    assert server.requests == []
