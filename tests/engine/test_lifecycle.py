"""Run lifecycle: resume, idempotency, input checks, concurrency limits, versions, restarts."""

from __future__ import annotations

import asyncio

import pytest
from tests.engine import impls
from tests.engine.helpers import make_spec, parked, run_to_end, steps_of, tag, tool

from controltower.engine import EmbeddedEngine
from controltower.spec.errors import InvalidInputError, InvalidStateError
from controltower.spec.models import WorkflowSpec
from controltower.store import RunFilter, RunRecord


async def test_resume_failed_run_from_the_failed_step(engine: EmbeddedEngine) -> None:
    t = tag()
    spec = make_spec(
        "resume",
        [
            tool("a", "count", {"tag": t, "name": "a"}),
            tool("b", "gated", {"tag": t}),
            tool("c", "count", {"tag": t, "name": "c", "b": "${{ steps.b.output.gated }}"}),
        ],
    )
    impls.FLAGS[t] = True
    run = await run_to_end(engine, spec)
    assert run.status == "failed"
    assert run.error is not None
    assert run.error["step"] == "b"
    assert (impls.CALLS[f"{t}:a"], impls.CALLS[f"{t}:gated"], impls.CALLS[f"{t}:c"]) == (1, 1, 0)

    impls.FLAGS[t] = False
    await engine.resume(run.id)
    done = await engine.wait(run.id, timeout=5)
    assert done.status == "completed", done.error
    assert done.error is None
    assert done.output["b"] == "passed"
    assert (impls.CALLS[f"{t}:a"], impls.CALLS[f"{t}:gated"], impls.CALLS[f"{t}:c"]) == (1, 2, 1)
    steps = await steps_of(engine, run.id)
    assert all(s.status == "completed" for s in steps.values())
    with pytest.raises(InvalidStateError):
        await engine.resume(run.id)


async def test_start_with_idempotency_key_returns_same_run(engine: EmbeddedEngine) -> None:
    t = tag()
    spec = make_spec("idem", [tool("a", "count", {"tag": t, "name": "a", "n": "${{ input.n }}"})])
    first = await engine.start(spec, {"n": 1}, idempotency_key="order-1")
    again = await engine.start(spec, {"n": 2}, idempotency_key="order-1")
    assert again == first
    other = await engine.start(spec, {"n": 3}, idempotency_key="order-2")
    assert other != first
    assert (await engine.wait(first, timeout=5)).output["n"] == 1
    await engine.wait(other, timeout=5)
    assert len(await engine.store.list_runs(RunFilter(workflow="idem"))) == 2
    assert impls.CALLS[f"{t}:a"] == 2


async def test_input_schema_violation_writes_no_run(engine: EmbeddedEngine) -> None:
    schema = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}
    spec = make_spec("strict-in", [tool("a", "echo", {"n": "${{ input.n }}"})], input_schema=schema)
    with pytest.raises(InvalidInputError) as info:
        await engine.start(spec, {"n": "one"})
    assert "n" in str(info.value)
    with pytest.raises(InvalidInputError):
        await engine.start(spec, {})
    assert await engine.store.list_runs(RunFilter()) == []
    assert await engine.store.list_workflows() == []  # not even a published version
    run = await run_to_end(engine, spec, {"n": 1})
    assert run.status == "completed"
    assert len(await engine.store.list_runs(RunFilter())) == 1


async def test_non_json_input_is_rejected(engine: EmbeddedEngine) -> None:
    spec = make_spec("nonjson", [tool("a", "echo")])
    with pytest.raises(InvalidInputError):
        await engine.start(spec, {"x": object()})
    assert await engine.store.list_runs(RunFilter()) == []


async def test_concurrency_max_runs_limits_runs_in_flight(engine: EmbeddedEngine) -> None:
    t = tag()
    spec = make_spec(
        "limited",
        [tool("work", "track", {"tag": t, "item": "${{ input.i }}", "seconds": 0.15})],
        concurrency={"max_runs": 2},
    )
    ids = [await engine.start(spec, {"i": i}) for i in range(5)]
    runs = await asyncio.gather(*(engine.wait(rid, timeout=10) for rid in ids))
    assert [r.status for r in runs] == ["completed"] * 5
    assert [r.output["item"] for r in runs] == list(range(5))
    assert impls.PEAK[t] == 2


async def test_unlimited_runs_overlap(engine: EmbeddedEngine) -> None:
    t = tag()
    spec = make_spec("unlimited", [tool("work", "track", {"tag": t, "seconds": 0.15})])
    ids = [await engine.start(spec) for _ in range(4)]
    await asyncio.gather(*(engine.wait(rid, timeout=10) for rid in ids))
    assert impls.PEAK[t] == 4  # the control for the test above: without a limit they overlap


def versioned(v: int) -> WorkflowSpec:
    return make_spec("pinned", [{"id": "ok", "kind": "approval"}, tool("out", "echo", {"v": v})])


async def test_run_is_pinned_to_its_version(engine: EmbeddedEngine) -> None:
    v1_run = await engine.start(versioned(1))
    await parked(engine, v1_run)
    v2 = await engine.publish(versioned(2))
    assert v2.version == 2
    assert (await engine.publish(versioned(2))).version == 2  # same content keeps its version

    v2_run = await engine.start("pinned")
    await parked(engine, v2_run)
    assert (await engine.get(v2_run)).version == 2
    await engine.approve(v1_run, "ok", by="ann")
    await engine.approve(v2_run, "ok", by="ann")
    old, new = await engine.wait(v1_run, timeout=5), await engine.wait(v2_run, timeout=5)
    assert (old.version, old.output) == (1, {"v": 1})
    assert (new.version, new.output) == (2, {"v": 2})
    v1_again = await run_to_end_approved(engine, "pinned", version=1)
    assert v1_again.output == {"v": 1}


async def run_to_end_approved(engine: EmbeddedEngine, name: str, version: int) -> RunRecord:
    run_id = await engine.start(name, version=version)
    await parked(engine, run_id)
    await engine.approve(run_id, "ok", by="ann")
    return await engine.wait(run_id, timeout=5)


async def test_parked_run_survives_an_engine_restart(engine: EmbeddedEngine, store_url: str) -> None:
    run_id = await engine.start(versioned(1))
    await parked(engine, run_id)
    await engine.close()

    fresh = await EmbeddedEngine.open(store_url, poll_interval=0.05)
    try:
        # publish v2 in the new process: the parked run must keep v1 behaviour from the store
        assert (await fresh.publish(versioned(2))).version == 2
        assert await fresh.approve(run_id, "ok", by="ann") == "ok"
        run = await fresh.wait(run_id, timeout=5)
        assert run.status == "completed", run.error
        assert run.output == {"v": 1}
        assert run.owner is None
        steps = await steps_of(fresh, run_id)
        assert steps["ok"].output["by"] == "ann"
    finally:
        await fresh.close()


async def test_worker_loop_picks_up_pending_runs(engine: EmbeddedEngine) -> None:
    spec = make_spec("queued", [tool("a", "echo", {"n": "${{ input.n }}"})])
    ids = [await engine.start(spec, {"n": i}, execute=False) for i in range(3)]
    assert {(await engine.get(rid)).status for rid in ids} == {"pending"}
    stop = asyncio.Event()
    worker = asyncio.create_task(engine.work(stop))
    try:
        runs = [await engine.wait(rid, timeout=5) for rid in ids]
    finally:
        stop.set()
        await worker
    assert [r.output for r in runs] == [{"n": 0}, {"n": 1}, {"n": 2}]


async def test_recover_takes_over_an_orphaned_run(engine: EmbeddedEngine) -> None:
    spec = make_spec("orphan", [tool("a", "echo", {"n": 1})])
    run_id = await engine.start(spec, execute=False)
    # a dead process claimed it and its lease ran out
    assert await engine.store.claim_run(run_id, "dead-process", 0.0, 1.0)
    assert await engine.recover() == 1
    run = await engine.wait(run_id, timeout=5)
    assert (run.status, run.output) == ("completed", {"n": 1})
