"""Edge cases: approval SLAs, repeated events, races between operators, cancelling gated runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
from tests.engine import impls
from tests.engine.helpers import IMPLS, make_spec, parked, run_to_end, steps_of, tag, tool

from controltower.engine import EmbeddedEngine
from controltower.spec.errors import ConflictError, InvalidStateError


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# -- approval SLAs ----------------------------------------------------------------------------


async def test_approval_sla_timeout_fails(engine: EmbeddedEngine) -> None:
    spec = make_spec("sla-fail", [{"id": "ok", "kind": "approval", "sla": "200ms"}])
    run = await run_to_end(engine, spec)
    assert run.status == "failed"
    assert run.error is not None
    assert (run.error["code"], run.error["step"]) == ("approval_timeout", "ok")


async def test_approval_sla_timeout_rejects_and_continues(engine: EmbeddedEngine) -> None:
    spec = make_spec(
        "sla-reject",
        [
            {"id": "ok", "kind": "approval", "sla": 0.2, "on_timeout": "reject", "on_reject": "continue"},
            tool("after", "echo", {"approved": "${{ steps.ok.output.approved }}"}),
        ],
    )
    run = await run_to_end(engine, spec)
    assert run.status == "completed", run.error
    assert run.output == {"approved": False}
    assert (await steps_of(engine, run.id))["ok"].output["timed_out"] is True


async def test_approval_sla_escalates_then_approve(engine: EmbeddedEngine) -> None:
    spec = make_spec(
        "sla-esc",
        [
            {
                "id": "ok",
                "kind": "approval",
                "group": "clerks",
                "sla": 0.2,
                "on_timeout": "escalate",
                "escalate_to": "managers",
            }
        ],
    )
    run_id = await engine.start(spec)
    await parked(engine, run_id)
    assert (await steps_of(engine, run_id))["ok"].detail["group"] == "clerks"

    async def escalated() -> bool:
        return bool((await steps_of(engine, run_id))["ok"].detail.get("escalated"))

    await until(escalated)
    record = (await steps_of(engine, run_id))["ok"]
    assert (record.status, record.detail["group"]) == ("waiting", "managers")
    run = await parked(engine, run_id)
    assert run.wake_at is None  # no second deadline after escalation
    await engine.approve(run_id, "ok", by="boss")
    run = await engine.wait(run_id, timeout=5)
    assert run.status == "completed", run.error
    assert run.output["by"] == "boss"


# -- events -------------------------------------------------------------------------------------


async def test_each_event_is_consumed_by_one_wait(engine: EmbeddedEngine) -> None:
    spec = make_spec(
        "two-waits",
        [{"id": "w1", "kind": "wait", "event": "go"}, {"id": "w2", "kind": "wait", "event": "go"}],
    )
    run_id = await engine.start(spec)
    await parked(engine, run_id)
    await engine.signal(run_id, "go", 1)

    async def first_done() -> bool:
        return (await steps_of(engine, run_id)).get("w2") is not None

    await until(first_done)
    run = await parked(engine, run_id)
    assert run.waiting_on == "event:w2"
    await engine.signal(run_id, "go", 2)
    run = await engine.wait(run_id, timeout=5)
    assert run.status == "completed", run.error
    steps = await steps_of(engine, run_id)
    assert (steps["w1"].output["data"], steps["w2"].output["data"]) == (1, 2)


async def test_events_in_a_map_are_shared_out_one_each(engine: EmbeddedEngine) -> None:
    spec = make_spec(
        "map-waits",
        [
            {
                "id": "m",
                "kind": "parallel",
                "map": {"over": "input.items", "steps": [{"id": "w", "kind": "wait", "event": "go"}]},
            }
        ],
    )
    run_id = await engine.start(spec, {"items": ["a", "b"]})
    await parked(engine, run_id)
    await engine.signal(run_id, "go", "first")

    async def one_done() -> bool:
        steps = await steps_of(engine, run_id)
        return any(s.status == "completed" for s in steps.values())

    await until(one_done)
    await parked(engine, run_id)
    await engine.signal(run_id, "go", "second")
    run = await engine.wait(run_id, timeout=5)
    assert run.status == "completed", run.error
    assert sorted(o["data"] for o in run.output) == ["first", "second"]


# -- races and joins ----------------------------------------------------------------------------


async def test_concurrent_decisions_only_one_wins(engine: EmbeddedEngine) -> None:
    spec = make_spec("race", [{"id": "ok", "kind": "approval"}])
    run_id = await engine.start(spec)
    await parked(engine, run_id)
    assert await engine.store.claim_run(run_id, "elsewhere", time.time(), 30)
    outcomes = await asyncio.gather(
        engine.approve(run_id, "ok", by="ann"), engine.reject(run_id, "ok", by="bob"), return_exceptions=True
    )
    await engine.store.release_run(run_id, "elsewhere")
    await engine.wake(run_id)
    await engine.wait(run_id, timeout=5)
    assert sum(isinstance(o, ConflictError) for o in outcomes) == 1
    assert len(await engine.store.list_signals(run_id)) == 1


async def test_join_any_ignores_a_parked_branch(engine: EmbeddedEngine) -> None:
    spec = make_spec(
        "any-parked",
        [
            {
                "id": "par",
                "kind": "parallel",
                "join": "any",
                "branches": {
                    "gate": [{"id": "ok", "kind": "approval"}],
                    "auto": [tool("x", "echo", {"auto": True})],
                },
            }
        ],
    )
    run = await run_to_end(engine, spec)
    assert run.status == "completed", run.error
    assert run.output == {"gate": None, "auto": {"auto": True}}
    with pytest.raises(InvalidStateError):
        await engine.approve(run.id, "ok", by="ann")


async def test_delegate_worker_failure_stops_sibling_workers(engine: EmbeddedEngine) -> None:
    t = tag()
    agents = {
        name: {"kind": "python", "impl": f"{IMPLS}:{name}"} for name in ("split_manager", "boom", "slowpoke")
    }
    step = {
        "id": "del",
        "kind": "delegate",
        "manager": "split_manager",
        "workers": ["boom", "slowpoke"],
        "input": {"tag": t},
    }
    # regression: _delegate used a bare gather, so the slow sibling ran to completion after the failure
    run = await run_to_end(engine, make_spec("deleg-fail", [step], agents=agents))
    assert run.status == "failed"
    assert run.error is not None
    assert run.error["message"] == "worker exploded"
    await asyncio.sleep(0.6)
    assert impls.EVENTS[t] == ["slowpoke:start"]


async def test_cancel_a_run_queued_behind_max_runs(engine: EmbeddedEngine) -> None:
    t = tag()
    spec = make_spec("gated", [tool("s", "slow", {"tag": t, "seconds": 5})], concurrency={"max_runs": 1})
    first = await engine.start(spec)
    second = await engine.start(spec)
    await asyncio.sleep(0.1)
    assert impls.EVENTS[t] == ["slow:start"]  # only one got through the gate
    started = time.monotonic()
    assert (await engine.cancel(second)).status == "cancelled"
    assert (await engine.cancel(first)).status == "cancelled"
    assert time.monotonic() - started < 2
    assert impls.EVENTS[t] == ["slow:start"]


# -- known gaps, reported to the lead -----------------------------------------------------------


async def test_resume_after_compensation_redoes_compensated_steps(engine: EmbeddedEngine) -> None:
    t = tag()
    impls.FLAGS[t] = True
    spec = make_spec(
        "resume-saga",
        [
            tool(
                "book",
                "record",
                {"tag": t, "name": "book"},
                compensate={"tool": "record", "input": {"tag": t, "name": "undo"}},
            ),
            tool("pay", "gated", {"tag": t}),
        ],
    )
    run = await run_to_end(engine, spec)
    assert run.status == "failed"
    assert impls.EVENTS[t] == ["book", "undo"]
    impls.FLAGS[t] = False
    await engine.resume(run.id)
    assert (await engine.wait(run.id, timeout=5)).status == "completed"
    assert impls.EVENTS[t] == ["book", "undo", "book"]


async def test_cancel_parent_cancels_active_child(engine: EmbeddedEngine) -> None:
    await engine.publish(make_spec("kid", [{"id": "ok", "kind": "approval"}]))
    run_id = await engine.start(
        make_spec("parent", [{"id": "sub", "kind": "subworkflow", "workflow": "kid"}])
    )
    await parked(engine, run_id)
    child_id = (await steps_of(engine, run_id))["sub"].detail["child_run_id"]
    await parked(engine, child_id)
    assert (await engine.cancel(run_id)).status == "cancelled"
    assert (await engine.get(child_id)).status == "cancelled"
