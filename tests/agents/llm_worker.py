"""Subprocess for the crash test: ``python llm_worker.py crash|recover DB_URL``.

``crash`` starts one run of an llm agent on a scripted model and is SIGKILLed by the agent's
second tool (after two model calls were recorded). ``recover`` opens a fresh engine on the
same store, recovers the run with a model that counts its calls, and prints a JSON report.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from controltower.engine import EmbeddedEngine
from controltower.gateway.engine_gate import GovernedToolGate
from controltower.gateway.pipeline import open_gateway
from controltower.models import override_models
from controltower.models.testing import FunctionModel, ScriptedModel, call, output
from controltower.spec.models import WorkflowSpec

POLICY = 'permit (principal in Workflow::"crashy", action in Action::"read", resource);'
SPEC = {
    "name": "crashy",
    "tools": {
        "lookup": {"impl": "tests.agents.agent_tools:lookup"},
        "crash": {"impl": "tests.agents.agent_tools:crash"},
    },
    "agents": {
        "triage": {
            "kind": "llm",
            "model": "openai:gpt-4o-mini",
            "tools": ["lookup", "crash"],
            "output_schema": {"type": "object", "required": ["category"]},
            "autonomy": "expanded",
        }
    },
    "steps": [{"id": "triage", "kind": "agent", "agent": "triage", "input": "${{ input }}"}],
}


async def main(mode: str, url: str) -> None:
    engine = await EmbeddedEngine.open(url, lease=0.5, poll_interval=0.05)
    gateway = await open_gateway(engine.store, policy_texts={"crashy.cedar": POLICY})
    engine.tool_gate = GovernedToolGate(gateway)
    spec = WorkflowSpec.model_validate(SPEC)
    try:
        if mode == "crash":
            model: Any = ScriptedModel([call("lookup", ticket="T-9", tag="crash"), call("crash")])
            with override_models({"openai:gpt-4o-mini": model}):
                run_id = await engine.start(spec, {"text": "charged twice"}, idempotency_key="crash-1")
                print("started", run_id, flush=True)
                await engine.wait(run_id, timeout=30)
            print("not killed", flush=True)
            return
        histories: list[int] = []

        def answer(messages: list[Any], info: Any) -> Any:
            histories.append(len(messages))
            return output({"category": "billing"})

        recovering = FunctionModel(answer)
        with override_models({"openai:gpt-4o-mini": recovering}):
            run_id = await engine.start(spec, {"text": "charged twice"}, idempotency_key="crash-1")
            for _ in range(200):
                await engine.recover()
                run = await engine.get(run_id)
                if run.status in ("completed", "failed"):
                    break
                await asyncio.sleep(0.05)
            await engine.drain()
        print(
            json.dumps(
                {"status": run.status, "output": run.output, "error": run.error, "histories": histories}
            )
        )
    finally:
        await engine.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
