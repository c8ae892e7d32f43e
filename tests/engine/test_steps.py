"""Leaf steps and sequencing: data flow, schemas, routes, retries, timeouts, compensation."""

from __future__ import annotations

import time
from typing import Any

import pytest
from tests.engine import impls
from tests.engine.helpers import make_spec, run_to_end, steps_of, tag, tool

from controltower.engine import EmbeddedEngine


async def test_sequential_data_flow(engine: EmbeddedEngine) -> None:
    t = tag()
    spec = make_spec(
        "seq",
        [
            tool("a", "echo", {"x": "${{ input.n }}"}),
            tool("b", "echo", {"y": "${{ steps.a.output.x + 1 }}", "s": "n=${{ input.n }}!"}),
            tool("c", "count", {"tag": t, "name": "c", "prev": "${{ steps.b.output }}"}),
        ],
        output={
            "result": "${{ steps.b.output.y }}",
            "text": "${{ steps.c.output.prev.s }}",
            "wf": "${{ run.workflow }}",
        },
    )
    run = await run_to_end(engine, spec, {"n": 1})
    assert run.status == "completed", run.error
    assert run.output == {"result": 2, "text": "n=1!", "wf": "seq"}
    steps = await steps_of(engine, run.id)
    assert list(steps) == ["a", "b", "c"]
    assert steps["a"].input == {"x": 1}
    assert steps["b"].output == {"y": 2, "s": "n=1!"}
    assert all(s.status == "completed" and s.attempts == 1 for s in steps.values())
    assert impls.CALLS[f"{t}:c"] == 1


async def test_output_defaults_to_last_step(engine: EmbeddedEngine) -> None:
    spec = make_spec("last", [tool("a", "echo", {"k": "a"}), tool("b", "echo", {"k": "b"})])
    run = await run_to_end(engine, spec)
    assert run.output == {"k": "b"}


async def test_expression_error_fails_the_step(engine: EmbeddedEngine) -> None:
    spec = make_spec("expr", [tool("a", "echo", {"x": "${{ input.n + 1 }}"})])
    run = await run_to_end(engine, spec, {"n": "text"})
    assert run.status == "failed"
    assert run.error is not None
    assert run.error["step"] == "a"
    assert run.error["code"] == "expression_error"
    assert (await steps_of(engine, run.id))["a"].status == "failed"


async def test_tool_input_schema_violation_fails_without_retry(engine: EmbeddedEngine) -> None:
    schema = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}
    spec = make_spec(
        "in-schema",
        [tool("a", "strict", {"n": "${{ input.n }}"}, retry={"max_attempts": 3, "initial_interval": 0.01})],
        tools={"strict": {"impl": "builtin:echo", "input_schema": schema}},
    )
    ok = await run_to_end(engine, spec, {"n": 3})
    assert ok.status == "completed"
    assert ok.output == {"n": 3}
    bad = await run_to_end(engine, spec, {"n": "three"})
    assert bad.status == "failed"
    assert bad.error is not None
    assert "input of tool 'strict'" in bad.error["message"]
    assert "n" in bad.error["message"]
    step = (await steps_of(engine, bad.id))["a"]
    assert (step.status, step.attempts) == ("failed", 1)


async def test_tool_and_step_output_schema_violations(engine: EmbeddedEngine) -> None:
    number = {"type": "object", "properties": {"score": {"type": "number"}}}
    spec = make_spec(
        "out-schema",
        [tool("a", "scored")],
        tools={"scored": {"impl": "tests.engine.impls:bad_output", "output_schema": number}},
    )
    run = await run_to_end(engine, spec)
    assert run.status == "failed"
    assert run.error is not None
    assert "output of tool 'scored'" in run.error["message"]
    assert "score" in run.error["message"]

    step_level = make_spec("step-schema", [tool("a", "bad_output", output_schema=number)])
    run = await run_to_end(engine, step_level)
    assert run.status == "failed"
    assert run.error is not None
    assert "output of step 'a'" in run.error["message"]


ROUTE_STEPS = [
    {
        "id": "r",
        "kind": "route",
        "routes": [{"when": "input.n > 10", "goto": "big"}, {"when": "input.n < 0", "goto": "end"}],
        "default": "small",
    },
    tool("small", "echo", {"size": "small"}, next="end"),
    tool("big", "echo", {"size": "big", "n": "${{ input.n }}"}),
]


@pytest.mark.parametrize(
    ("n", "output", "ran", "route"),
    [
        (50, {"size": "big", "n": 50}, ["r", "big"], {"goto": "big", "matched": 0}),
        (5, {"size": "small"}, ["r", "small"], {"goto": "small", "matched": None}),
        (-1, None, ["r"], {"goto": "end", "matched": 1}),
    ],
)
async def test_route(
    engine: EmbeddedEngine, n: int, output: object, ran: list[str], route: dict[str, Any]
) -> None:
    run = await run_to_end(engine, make_spec("route", ROUTE_STEPS), {"n": n})
    assert run.status == "completed", run.error
    assert run.output == output
    steps = await steps_of(engine, run.id)
    assert sorted(steps) == sorted(ran)
    assert steps["r"].output == route


async def test_retry_with_backoff_then_success(engine: EmbeddedEngine) -> None:
    t = tag()
    retry = {"max_attempts": 5, "initial_interval": 0.05, "backoff": 2, "jitter": 0}
    spec = make_spec("retry", [tool("a", "flaky", {"tag": t, "succeed_on": 3}, retry=retry)])
    started = time.monotonic()
    run = await run_to_end(engine, spec)
    elapsed = time.monotonic() - started
    assert run.status == "completed", run.error
    assert run.output == {"attempt": 3, "key": f"{run.id}:a"}
    step = (await steps_of(engine, run.id))["a"]
    assert (step.status, step.attempts, step.error) == ("completed", 3, None)
    assert elapsed >= 0.05 + 0.1 - 0.01  # two backoff sleeps: 50 ms then 100 ms
    contexts = impls.CONTEXTS[t]
    assert [c.attempt for c in contexts] == [1, 2, 3]
    assert {c.idempotency_key for c in contexts} == {f"{run.id}:a"}


async def test_retries_exhausted(engine: EmbeddedEngine) -> None:
    t = tag()
    retry = {"max_attempts": 2, "initial_interval": 0.01}
    spec = make_spec("exhaust", [tool("a", "flaky", {"tag": t, "succeed_on": 10}, retry=retry)])
    run = await run_to_end(engine, spec)
    assert run.status == "failed"
    assert run.error is not None
    assert run.error["type"] == "RuntimeError"
    assert "attempt 2" in run.error["message"]
    step = (await steps_of(engine, run.id))["a"]
    assert (step.status, step.attempts) == ("failed", 2)


async def test_non_retryable_failures_run_once(engine: EmbeddedEngine) -> None:
    t = tag()
    retry = {"max_attempts": 5, "initial_interval": 0.01, "non_retryable": ["KeyError"]}
    spec = make_spec("noretry", [tool("a", "business_no", {"tag": t}, retry=retry)])
    run = await run_to_end(engine, spec)
    assert run.status == "failed"
    assert run.error is not None
    assert run.error["message"] == "the customer said no"
    assert (await steps_of(engine, run.id))["a"].attempts == 1
    assert impls.CALLS[f"{t}:business_no"] == 1

    by_name = make_spec("noretry2", [tool("a", "key_error", {"tag": t}, retry=retry)])
    run = await run_to_end(engine, by_name)
    assert run.status == "failed"
    assert (await steps_of(engine, run.id))["a"].attempts == 1
    assert impls.CALLS[f"{t}:key_error"] == 1


async def test_timeout(engine: EmbeddedEngine) -> None:
    t = tag()
    spec = make_spec("timeout", [tool("a", "slow", {"tag": t, "seconds": 5}, timeout="200ms")])
    started = time.monotonic()
    run = await run_to_end(engine, spec)
    assert time.monotonic() - started < 2
    assert run.status == "failed"
    assert run.error is not None
    assert run.error["message"] == "timed out after 0.2s"
    assert impls.EVENTS[t] == ["slow:start"]


async def test_compensation_runs_in_reverse_order(engine: EmbeddedEngine) -> None:
    t = tag()

    def undo(name: str) -> dict[str, Any]:
        return {"tool": "record", "input": {"tag": t, "name": "undo:${{ this.output.recorded }}"}}

    spec = make_spec(
        "saga",
        [
            tool("book", "record", {"tag": t, "name": "book"}, compensate=undo("book")),
            tool("notify", "record", {"tag": t, "name": "notify"}),
            tool("charge", "record", {"tag": t, "name": "charge"}, compensate=undo("charge")),
            tool("ship", "fail", {"message": "no truck"}, compensate=undo("ship")),
            tool("never", "record", {"tag": t, "name": "never"}, compensate=undo("never")),
        ],
    )
    run = await run_to_end(engine, spec)
    assert run.status == "failed"
    assert impls.EVENTS[t] == ["book", "notify", "charge", "undo:charge", "undo:book"]
    assert run.error is not None
    assert run.error["step"] == "ship"
    assert run.error["message"] == "no truck"
    assert run.error["compensation"] == [
        {"step": "charge", "status": "completed"},
        {"step": "book", "status": "completed"},
    ]
    steps = await steps_of(engine, run.id)
    for key in ("book", "charge"):
        comp = steps[f"compensate:{key}"]
        assert (comp.status, comp.kind, comp.output) == (
            "completed",
            "compensation",
            {"recorded": f"undo:{key}"},
        )
    assert "compensate:ship" not in steps
    assert "compensate:never" not in steps
    assert "never" not in steps
