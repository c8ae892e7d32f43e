"""Steps that park a run: events, timers, approvals, child runs; and cancelling runs."""

from __future__ import annotations

import asyncio
import time

import pytest
from tests.engine import impls
from tests.engine.helpers import make_spec, parked, run_to_end, steps_of, tag, tool

from controltower.engine import EmbeddedEngine
from controltower.spec.errors import ConflictError, InvalidStateError, NotFoundError
from controltower.spec.models import WorkflowSpec
from controltower.store import RunFilter

# -- wait: events and timers ---------------------------------------------------------------------


async def test_wait_for_event_delivers_data(engine: EmbeddedEngine) -> None:
    spec = make_spec(
        "evt",
        [
            {"id": "w", "kind": "wait", "event": "paid"},
            tool("after", "echo", {"amount": "${{ steps.w.output.data.amount }}"}),
        ],
    )
    run_id = await engine.start(spec)
    waiting = await parked(engine, run_id)
    assert waiting.waiting_on == "event:w"
    assert waiting.owner is None
    assert (await steps_of(engine, run_id))["w"].status == "waiting"

    await engine.signal(run_id, "paid", {"amount": 42})
    run = await engine.wait(run_id, timeout=5)
    assert run.status == "completed", run.error
    assert run.output == {"amount": 42}
    steps = await steps_of(engine, run_id)
    assert steps["w"].output == {"event": "paid", "data": {"amount": 42}, "timed_out": False}
    (signal,) = await engine.store.list_signals(run_id)
    assert signal.consumed_at is not None
    with pytest.raises(InvalidStateError):
        await engine.signal(run_id, "paid", {})


async def test_event_sent_before_the_wait_is_reached(engine: EmbeddedEngine) -> None:
    spec = make_spec(
        "evt-early",
        [tool("busy", "sleep", {"seconds": 0.3}), {"id": "w", "kind": "wait", "event": "go"}],
    )
    run_id = await engine.start(spec)
    await asyncio.sleep(0.1)
    assert (await engine.get(run_id)).status == "running"
    await engine.signal(run_id, "go", {"early": True})
    run = await engine.wait(run_id, timeout=5)
    assert run.status == "completed", run.error
    assert run.output == {"event": "go", "data": {"early": True}, "timed_out": False}


async def test_wait_on_timer(engine: EmbeddedEngine) -> None:
    spec = make_spec(
        "timer", [{"id": "pause", "kind": "wait", "duration": "200ms"}, tool("after", "echo", {"x": 1})]
    )
    started = time.monotonic()
    run_id = await engine.start(spec)
    waiting = await parked(engine, run_id)
    assert waiting.wake_at is not None
    run = await engine.wait(run_id, timeout=5)
    elapsed = time.monotonic() - started
    assert run.status == "completed", run.error
    assert 0.2 <= elapsed < 1.5
    steps = await steps_of(engine, run_id)
    assert steps["pause"].output == {"waited": 0.2}
    assert run.output == {"x": 1}


@pytest.mark.parametrize("on_timeout", ["continue", "fail"])
async def test_event_with_timeout(engine: EmbeddedEngine, on_timeout: str) -> None:
    spec = make_spec(
        f"evt-timeout-{on_timeout}",
        [{"id": "w", "kind": "wait", "event": "go", "duration": 0.2, "on_timeout": on_timeout}],
    )
    started = time.monotonic()
    run = await run_to_end(engine, spec)
    assert 0.2 <= time.monotonic() - started < 1.5
    if on_timeout == "continue":
        assert run.status == "completed", run.error
        assert run.output == {"event": "go", "data": None, "timed_out": True}
    else:
        assert run.status == "failed"
        assert run.error is not None
        assert (run.error["code"], run.error["step"]) == ("wait_timeout", "w")


async def test_event_arrives_before_timeout(engine: EmbeddedEngine) -> None:
    spec = make_spec("evt-in-time", [{"id": "w", "kind": "wait", "event": "go", "duration": 5}])
    run_id = await engine.start(spec)
    await parked(engine, run_id)
    await engine.signal(run_id, "go", [1, 2])
    run = await engine.wait(run_id, timeout=2)
    assert run.output == {"event": "go", "data": [1, 2], "timed_out": False}


# -- approvals ----------------------------------------------------------------------------------


def approval_spec(name: str, **approval: object) -> WorkflowSpec:
    return make_spec(
        name,
        [
            {
                "id": "ok",
                "kind": "approval",
                "prompt": "Ship it?",
                "input": {"n": "${{ input.n }}"},
                **approval,
            },
            tool(
                "after",
                "echo",
                {"approved": "${{ steps.ok.output.approved }}", "by": "${{ steps.ok.output.by }}"},
            ),
        ],
    )


async def test_approval_approve(engine: EmbeddedEngine) -> None:
    run_id = await engine.start(approval_spec("appr"), {"n": 5})
    waiting = await parked(engine, run_id)
    assert waiting.waiting_on == "approval:ok"
    step = (await steps_of(engine, run_id))["ok"]
    assert (step.status, step.input, step.detail["prompt"]) == ("waiting", {"n": 5}, "Ship it?")

    with pytest.raises(NotFoundError):
        await engine.approve(run_id, "nope", by="ann")
    assert await engine.approve(run_id, "ok", by="ann", comment="fine") == "ok"
    run = await engine.wait(run_id, timeout=5)
    assert run.status == "completed", run.error
    assert run.output == {"approved": True, "by": "ann"}
    decided = (await steps_of(engine, run_id))["ok"].output
    assert (decided["approved"], decided["by"], decided["comment"]) == (True, "ann", "fine")
    with pytest.raises(InvalidStateError):
        await engine.approve(run_id, "ok", by="ann")


async def test_approval_reject_fails(engine: EmbeddedEngine) -> None:
    run_id = await engine.start(approval_spec("appr-rej"), {"n": 1})
    await parked(engine, run_id)
    await engine.reject(run_id, "ok", by="bob", comment="too risky")
    run = await engine.wait(run_id, timeout=5)
    assert run.status == "failed"
    assert run.error is not None
    assert (run.error["code"], run.error["step"]) == ("rejected", "ok")
    assert "bob" in run.error["message"]
    assert "too risky" in run.error["message"]
    assert "after" not in await steps_of(engine, run_id)


async def test_approval_reject_continues(engine: EmbeddedEngine) -> None:
    run_id = await engine.start(approval_spec("appr-cont", on_reject="continue"), {"n": 1})
    await parked(engine, run_id)
    await engine.reject(run_id, "ok", by="bob")
    run = await engine.wait(run_id, timeout=5)
    assert run.status == "completed", run.error
    assert run.output == {"approved": False, "by": "bob"}


async def test_approval_inside_map_needs_the_key(engine: EmbeddedEngine) -> None:
    spec = make_spec(
        "appr-map",
        [
            {
                "id": "m",
                "kind": "parallel",
                "map": {"over": "input.items", "steps": [{"id": "ok", "kind": "approval"}]},
            }
        ],
    )
    run_id = await engine.start(spec, {"items": ["a", "b"]})
    await parked(engine, run_id)
    with pytest.raises(ConflictError) as info:
        await engine.approve(run_id, "ok", by="ann")
    assert "m[0]/ok" in str(info.value)
    assert "m[1]/ok" in str(info.value)
    assert await engine.approve(run_id, "m[1]/ok", by="ann") == "m[1]/ok"
    await parked(engine, run_id)
    assert await engine.approve(run_id, "ok", by="bob") == "m[0]/ok"  # only one left: the id is enough
    run = await engine.wait(run_id, timeout=5)
    assert run.status == "completed", run.error
    assert [o["by"] for o in run.output] == ["bob", "ann"]


async def test_deciding_twice_is_a_conflict(engine: EmbeddedEngine) -> None:
    run_id = await engine.start(approval_spec("appr-twice"), {"n": 1})
    await parked(engine, run_id)
    # another process holds the run, so the decision stays pending while we decide again
    assert await engine.store.claim_run(run_id, "elsewhere", time.time(), 30)
    await engine.approve(run_id, "ok", by="ann")
    with pytest.raises(ConflictError):
        await engine.reject(run_id, "ok", by="bob")
    with pytest.raises(ConflictError):
        await engine.approve(run_id, "ok", by="ann")
    await engine.store.release_run(run_id, "elsewhere")
    assert await engine.wake(run_id)
    run = await engine.wait(run_id, timeout=5)
    assert run.status == "completed", run.error
    assert run.output == {"approved": True, "by": "ann"}
    assert len(await engine.store.list_signals(run_id)) == 1


# -- subworkflows -------------------------------------------------------------------------------


def parent_spec(child: str) -> WorkflowSpec:
    return make_spec(
        f"parent-of-{child}",
        [
            {"id": "sub", "kind": "subworkflow", "workflow": child, "input": {"x": "${{ input.x }}"}},
            tool("after", "echo", {"final": "${{ steps.sub.output.doubled }}"}),
        ],
    )


async def test_subworkflow_by_published_name(engine: EmbeddedEngine) -> None:
    child = make_spec("child", [tool("double", "echo", {"doubled": "${{ input.x * 2 }}"})])
    record = await engine.publish(child)
    assert record.version == 1
    run = await run_to_end(engine, parent_spec("child"), {"x": 21})
    assert run.status == "completed", run.error
    assert run.output == {"final": 42}
    (kid,) = await engine.store.list_runs(RunFilter(parent_run_id=run.id))
    assert (kid.workflow, kid.status, kid.parent_step_key, kid.output) == (
        "child",
        "completed",
        "sub",
        {"doubled": 42},
    )
    assert (await steps_of(engine, run.id))["sub"].detail["child_run_id"] == kid.id


async def test_subworkflow_parent_waits_for_parked_child(engine: EmbeddedEngine) -> None:
    child = make_spec(
        "child-appr",
        [{"id": "ok", "kind": "approval"}, tool("double", "echo", {"doubled": "${{ input.x * 2 }}"})],
    )
    await engine.publish(child)
    run_id = await engine.start(parent_spec("child-appr"), {"x": 5})
    await parked(engine, run_id)
    (kid,) = await engine.store.list_runs(RunFilter(parent_run_id=run_id))
    await parked(engine, kid.id)
    assert (await engine.get(run_id)).waiting_on == "child:sub"
    await engine.approve(kid.id, "ok", by="ann")
    run = await engine.wait(run_id, timeout=5)
    assert run.status == "completed", run.error
    assert run.output == {"final": 10}


async def test_subworkflow_child_failure_fails_parent(engine: EmbeddedEngine) -> None:
    await engine.publish(make_spec("child-bad", [tool("boom", "fail", {"message": "child broke"})]))
    run = await run_to_end(engine, parent_spec("child-bad"), {"x": 1})
    assert run.status == "failed"
    assert run.error is not None
    assert (run.error["code"], run.error["step"]) == ("child_failed", "sub")
    assert "child broke" in run.error["message"]


async def test_subworkflow_unknown_child_fails(engine: EmbeddedEngine) -> None:
    run = await run_to_end(engine, parent_spec("no-such-child"), {"x": 1})
    assert run.status == "failed"
    assert run.error is not None
    assert "no-such-child" in run.error["message"]


# -- cancel -------------------------------------------------------------------------------------


async def test_cancel_waiting_run(engine: EmbeddedEngine) -> None:
    run_id = await engine.start(approval_spec("cancel-wait"), {"n": 1})
    await parked(engine, run_id)
    run = await engine.cancel(run_id, reason="changed my mind")
    assert run.status == "cancelled"
    assert run.error is not None
    assert run.error["code"] == "cancelled"
    assert run.finished_at is not None
    with pytest.raises(InvalidStateError):
        await engine.approve(run_id, "ok", by="ann")
    with pytest.raises(InvalidStateError):
        await engine.cancel(run_id)


async def test_cancel_running_run(engine: EmbeddedEngine) -> None:
    t = tag()
    spec = make_spec(
        "cancel-run",
        [tool("s", "slow", {"tag": t, "seconds": 5}), tool("after", "record", {"tag": t, "name": "after"})],
    )
    run_id = await engine.start(spec)
    await asyncio.sleep(0.2)
    assert (await engine.get(run_id)).status == "running"
    started = time.monotonic()
    run = await engine.cancel(run_id)
    assert time.monotonic() - started < 2
    assert run.status == "cancelled"
    assert (await engine.wait(run_id, timeout=2)).status == "cancelled"
    await asyncio.sleep(0.05)
    assert impls.EVENTS[t] == ["slow:start"]
    assert "after" not in await steps_of(engine, run_id)
