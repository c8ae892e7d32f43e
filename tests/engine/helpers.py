"""Spec builders shared by the engine tests."""

from __future__ import annotations

import uuid
from typing import Any

from controltower.engine import EmbeddedEngine
from controltower.spec.models import WorkflowSpec
from controltower.store import RunRecord, StepRecord

IMPLS = "tests.engine.impls"

TOOLS: dict[str, dict[str, Any]] = {
    "echo": {"impl": "builtin:echo"},
    "noop": {"impl": "builtin:noop"},
    "sleep": {"impl": "builtin:sleep"},
    "fail": {"impl": "builtin:fail"},
    **{
        name: {"impl": f"{IMPLS}:{name}"}
        for name in (
            "count",
            "record",
            "track",
            "slow",
            "flaky",
            "business_no",
            "key_error",
            "gated",
            "bad_output",
        )
    },
}


def tag() -> str:
    """A unique key for one test's side effects in tests.engine.impls."""
    return uuid.uuid4().hex


def make_spec(name: str, steps: list[dict[str, Any]], **extra: Any) -> WorkflowSpec:
    tools = {**TOOLS, **extra.pop("tools", {})}
    return WorkflowSpec.model_validate({"name": name, "tools": tools, "steps": steps, **extra})


def tool(step_id: str, tool_name: str, input: Any = None, **extra: Any) -> dict[str, Any]:
    step: dict[str, Any] = {"id": step_id, "kind": "tool", "tool": tool_name, **extra}
    if input is not None:
        step["input"] = input
    return step


async def run_to_end(
    engine: EmbeddedEngine, spec: WorkflowSpec | str, input: Any = None, timeout: float = 10
) -> RunRecord:
    run_id = await engine.start(spec, input)
    return await engine.wait(run_id, timeout=timeout)


async def steps_of(engine: EmbeddedEngine, run_id: str) -> dict[str, StepRecord]:
    return await engine.store.load_steps(run_id)


async def parked(engine: EmbeddedEngine, run_id: str, timeout: float = 10) -> RunRecord:
    """Wait until the run is parked (waiting), failing if it finished instead."""
    return await engine.wait(run_id, statuses={"waiting"}, timeout=timeout)
