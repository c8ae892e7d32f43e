"""Model names, configuration sources, prices, and the errors a user sees."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from controltower.models import ModelConfigError, PriceTable, configured_model, override_models
from controltower.models.prices import Price
from controltower.models.registry import build_model, clear_cache
from controltower.models.testing import ScriptedModel
from controltower.spec.errors import InvalidInputError
from controltower.spec.models import AgentSpec, WorkflowSpec

STEPS = [{"id": "a", "kind": "agent", "agent": "a"}]


def workflow(agent: dict[str, object], **extra: object) -> WorkflowSpec:
    return WorkflowSpec.model_validate({"name": "w", "agents": {"a": agent}, "steps": STEPS, **extra})


def test_the_agent_model_wins_then_the_workflow_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOWER_MODEL", "ollama:llama3.2")
    spec = workflow({"kind": "llm"}, model="anthropic:claude-sonnet-4-5")
    assert configured_model(AgentSpec(kind="llm", model="openai:gpt-4o-mini"), spec) == "openai:gpt-4o-mini"
    assert configured_model(spec.agents["a"], spec) == "anthropic:claude-sonnet-4-5"
    assert configured_model(spec.agents["a"], workflow({"kind": "llm"})) == "ollama:llama3.2"
    monkeypatch.delenv("TOWER_MODEL")
    assert configured_model(spec.agents["a"], workflow({"kind": "llm"})) is None
    with override_models(default=ScriptedModel([])):
        assert configured_model(spec.agents["a"], workflow({"kind": "llm"})) is not None


def test_a_bad_model_name_is_a_typed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOWER_MODEL", "gpt-4o")
    with pytest.raises(ModelConfigError, match="provider:model"):
        configured_model(AgentSpec(kind="llm"), None)
    with pytest.raises(ValidationError, match="model"):
        AgentSpec(kind="llm", model="gpt-4o")
    clear_cache()
    with pytest.raises(ModelConfigError, match="nosuchprovider"):
        build_model("nosuchprovider:x")


def test_spec_checks_offline_and_agent_tools() -> None:
    with pytest.raises(ValidationError, match="offline"):
        AgentSpec(kind="llm", offline="no_colon")
    with pytest.raises(ValidationError, match="llm agents only"):
        AgentSpec(kind="python", impl="m:f", offline="m:g")
    with pytest.raises(ValidationError, match="agent name"):
        AgentSpec(kind="llm", tools=["agent:"])
    with pytest.raises(ValidationError, match="http"):
        AgentSpec(kind="remote", endpoint="ftp://x")


def test_prices_overrides_snapshot_and_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = PriceTable()
    snapshot = table.price("openai:gpt-4o-mini")
    assert snapshot == Price(150_000, 600_000, "genai-prices")
    assert table.price("ollama:llama3.2") == Price(0, 0, "local")
    assert table.price("mystery:model") is None
    assert table.cost("mystery:model", 10, 10) == 0
    # rounding up: 1 token at $0.15 / 1M is 0.15 micro-dollars -> 1
    assert table.cost("openai:gpt-4o-mini", 1, 0) == 1
    assert table.cost("openai:gpt-4o-mini", 1_000_000, 1_000_000) == 750_000

    file = tmp_path / "prices.yaml"
    file.write_text(
        "openai:gpt-4o-mini: {input: 1000000, output: 2000000}\nmystery:model: {input: 5, output: 7}\n"
    )
    monkeypatch.setenv("TOWER_MODEL_PRICES", str(file))
    custom = PriceTable.default()
    assert custom.price("openai:gpt-4o-mini") == Price(1_000_000, 2_000_000)
    assert custom.with_prices({"mystery:model": {"input": 1, "output": 1}}).price("mystery:model") == Price(
        1, 1
    )
    file.write_text("openai:gpt-4o-mini: {input: -1, output: 2}\n")
    with pytest.raises(InvalidInputError, match="whole numbers"):
        PriceTable.default()


def test_workflow_model_prices_are_validated() -> None:
    with pytest.raises(ValidationError, match="output"):
        workflow({"kind": "llm"}, model_prices={"openai:gpt-4o-mini": {"input": 1}})


def test_the_core_imports_without_pydantic_ai(tmp_path: Path) -> None:
    """A light core: specs, the engine and controltower.models load with pydantic_ai blocked;
    an llm agent with a model then fails with the extra to install."""
    code = (
        "import sys; sys.modules['pydantic_ai'] = None\n"
        "import controltower.models, controltower.engine.agents, controltower.engine\n"
        "from controltower.models.registry import require_llm\n"
        "try:\n    require_llm()\nexcept Exception as exc:\n    print(type(exc).__name__, exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "ModelsNotInstalledError" in out.stdout
    assert "pip install 'controltower[llm]'" in out.stdout


def test_exported_names_are_pinned() -> None:
    import controltower.models
    import controltower.models.testing

    assert set(controltower.models.__all__) == {
        "InvalidModelOutputError",
        "ModelBudgetExceededError",
        "ModelCallLog",
        "ModelCallRecord",
        "ModelConfigError",
        "ModelNotConfiguredError",
        "ModelUnavailableError",
        "ModelUsage",
        "ModelsNotInstalledError",
        "Price",
        "PriceTable",
        "RemoteAgentError",
        "build_model",
        "configured_model",
        "override_models",
    }
    assert {"ScriptedModel", "FunctionModel", "TestModel", "call", "output"} <= set(
        controltower.models.testing.__all__
    )
