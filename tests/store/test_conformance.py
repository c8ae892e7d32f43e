"""Store conformance: every backend behind ``open_store`` honours the same contract.

Each test runs on SQLite and on PostgreSQL (the ``store`` fixture is parametrised).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from controltower.spec.errors import LeaseLostError
from controltower.store import RunFilter, SqlStore, open_store

from .helpers import BIG, fetch, make_run, make_step, new_run, payload_rows

# -- workflows ---------------------------------------------------------------------


async def test_publish_versions_by_digest(store: SqlStore) -> None:
    now = time.time()
    v1 = await store.publish("wf", {"name": "wf", "v": 1}, "d1", "/base", now)
    assert (v1.name, v1.version, v1.digest) == ("wf", 1, "d1")
    same = await store.publish("wf", {"name": "wf", "v": 1}, "d1", "/base", now + 1)
    assert same.version == 1
    v2 = await store.publish("wf", {"name": "wf", "v": 2}, "d2", None, now + 2)
    assert v2.version == 2
    other = await store.publish("other", {"name": "other"}, "d1", None, now)
    assert other.version == 1  # versions count per name

    latest = await store.get_workflow("wf")
    assert latest is not None
    assert (latest.version, latest.spec, latest.base_dir) == (2, {"name": "wf", "v": 2}, None)
    first = await store.get_workflow("wf", 1)
    assert first is not None
    assert (first.version, first.spec, first.base_dir, first.digest) == (
        1,
        {"name": "wf", "v": 1},
        "/base",
        "d1",
    )
    assert await store.get_workflow("wf", 3) is None
    assert await store.get_workflow("missing") is None

    listed = [(w.name, w.version) for w in await store.list_workflows()]
    assert listed == [("other", 1), ("wf", 1), ("wf", 2)]


async def test_concurrent_publishes_get_distinct_versions(store: SqlStore) -> None:
    now = time.time()
    records = await asyncio.gather(*(store.publish("wf", {"i": i}, f"d{i}", None, now) for i in range(5)))
    assert sorted(r.version for r in records) == [1, 2, 3, 4, 5]
    for r in records:
        got = await store.get_workflow("wf", r.version)
        assert got is not None
        assert got.digest == r.digest


# -- runs ----------------------------------------------------------------------------


async def test_create_run_idempotency_key(store: SqlStore) -> None:
    first, created = await store.create_run(make_run(idempotency_key="k1", input={"n": 1}))
    assert created
    again, created = await store.create_run(make_run(idempotency_key="k1", input={"n": 2}))
    assert not created
    assert again.id == first.id
    assert again.input == {"n": 1}

    other_tenant, created = await store.create_run(make_run(idempotency_key="k1", tenant="acme"))
    assert created
    assert other_tenant.id != first.id
    other_wf, created = await store.create_run(make_run(workflow="wf2", idempotency_key="k1"))
    assert created
    assert other_wf.id not in (first.id, other_tenant.id)

    plain = [await store.create_run(make_run()) for _ in range(2)]
    assert all(created for _, created in plain)
    assert plain[0][0].id != plain[1][0].id
    assert len(await store.list_runs(RunFilter())) == 5


async def test_create_run_same_key_concurrently_creates_one(store: SqlStore) -> None:
    results = await asyncio.gather(*(store.create_run(make_run(idempotency_key="same")) for _ in range(5)))
    assert sum(created for _, created in results) == 1
    assert len({run.id for run, _ in results}) == 1
    assert len(await store.list_runs(RunFilter())) == 1


async def test_get_run_round_trip(store: SqlStore) -> None:
    run = make_run(input={"a": [1, 2, {"b": None}], "s": "ünïcode"}, tenant="t1", parent_run_id="run_p")
    await store.create_run(run)
    got = await store.get_run(run.id)
    assert got is not None
    assert got.input == run.input
    assert (got.tenant, got.parent_run_id, got.status, got.cancel_requested) == (
        "t1",
        "run_p",
        "pending",
        False,
    )
    assert await store.get_run("run_missing") is None


async def test_list_runs_filters_and_pagination(store: SqlStore) -> None:
    made = []
    for i in range(7):
        wf = "a" if i < 4 else "b"
        status = "completed" if i % 2 else "pending"
        made.append(await new_run(store, workflow=wf, status=status, tenant="t2" if i == 6 else "default"))
    ids = sorted((r.id for r in made), reverse=True)

    everything = await store.list_runs(RunFilter())
    assert [r.id for r in everything] == ids
    assert {r.id for r in await store.list_runs(RunFilter(workflow="a"))} == {r.id for r in made[:4]}
    done = await store.list_runs(RunFilter(status=["completed"]))
    assert {r.id for r in done} == {r.id for r in made if r.status == "completed"}
    both = await store.list_runs(RunFilter(workflow="b", status=["pending", "completed"]))
    assert len(both) == 3
    assert [r.id for r in await store.list_runs(RunFilter(tenant="t2"))] == [made[6].id]
    assert len(await store.list_runs(RunFilter(limit=3))) == 3

    pages: list[str] = []
    before = None
    while True:
        page = await store.list_runs(RunFilter(limit=3, before_id=before))
        if not page:
            break
        assert len(page) <= 3
        pages.extend(r.id for r in page)
        before = page[-1].id
    assert pages == ids


async def test_set_run_status_with_expect_and_owner(store: SqlStore) -> None:
    run = await new_run(store)
    now = time.time()
    assert await store.set_run_status(run.id, "running", now, expect=["pending"])
    assert not await store.set_run_status(run.id, "failed", now, expect=["pending"])
    got = await store.get_run(run.id)
    assert got is not None
    assert got.status == "running"

    # fenced by owner: nobody holds the lease, so the guarded write does not land
    assert not await store.set_run_status(run.id, "failed", now, owner="someone")
    assert await store.claim_run(run.id, "someone", now, 30)
    out = {"big": BIG}
    assert await store.set_run_status(
        run.id,
        "completed",
        now + 1,
        expect=["running"],
        owner="someone",
        extra={"output": out, "finished_at": now + 1, "owner": None},
    )
    got = await store.get_run(run.id)
    assert got is not None
    assert (got.status, got.output, got.finished_at, got.owner) == ("completed", out, now + 1, None)
    assert await store.set_run_status(run.id, "failed", now + 2)  # no guard: always lands
    assert (await fetch(store, run.id)).status == "failed"


async def test_update_run_fields(store: SqlStore) -> None:
    run = await new_run(store)
    await store.update_run(run.id, {"cancel_requested": True, "error": {"code": "x"}, "updated_at": 5.0})
    got = await store.get_run(run.id)
    assert got is not None
    assert (got.cancel_requested, got.error, got.updated_at) == (True, {"code": "x"}, 5.0)


# -- leases ----------------------------------------------------------------------------


async def test_claim_run_exclusive_and_expiring(store: SqlStore) -> None:
    run = await new_run(store)
    now = time.time()
    assert await store.claim_run(run.id, "a", now, 30)
    got = await store.get_run(run.id)
    assert got is not None
    assert (got.status, got.owner, got.lease_expires_at) == ("running", "a", now + 30)
    assert not await store.claim_run(run.id, "b", now + 1, 30)
    assert await store.claim_run(run.id, "a", now + 2, 30)  # the holder re-claims
    assert (await fetch(store, run.id)).lease_expires_at == now + 32
    assert await store.claim_run(run.id, "b", now + 40, 30)  # the lease expired
    assert (await fetch(store, run.id)).owner == "b"
    assert not await store.claim_run(run.id, "a", now + 41, 30)

    finished = await new_run(store, status="completed")
    assert not await store.claim_run(finished.id, "a", now, 30)
    assert not await store.claim_run("run_missing", "a", now, 30)


async def test_claim_run_concurrent_only_one_wins(store: SqlStore) -> None:
    run = await new_run(store)
    now = time.time()
    won = await asyncio.gather(*(store.claim_run(run.id, f"o{i}", now, 30) for i in range(5)))
    assert sum(won) == 1


async def test_claim_ready_picks_only_runnable(store: SqlStore) -> None:
    now = time.time()
    base = now - 100
    pending = await new_run(store, created_at=base + 1)
    orphan = await new_run(
        store, status="running", owner="dead", lease_expires_at=now - 1, created_at=base + 2
    )
    due = await new_run(store, status="waiting", wake_at=now - 1, created_at=base + 3)
    await new_run(store, status="waiting", wake_at=None, created_at=base + 4)
    await new_run(store, status="waiting", wake_at=now + 100, created_at=base + 5)
    await new_run(store, status="running", owner="other", lease_expires_at=now + 100, created_at=base + 6)
    await new_run(store, status="completed", created_at=base + 7)
    await new_run(store, status="failed", created_at=base + 8)

    claimed = await store.claim_ready("me", now, 30, 100)
    assert sorted(claimed) == sorted([pending.id, orphan.id, due.id])
    for rid in claimed:
        got = await store.get_run(rid)
        assert got is not None
        assert (got.status, got.owner, got.lease_expires_at, got.wake_at) == ("running", "me", now + 30, None)
    # now held by "me" with a live lease: nobody else gets them
    assert await store.claim_ready("you", now + 1, 30, 100) == []


async def test_claim_ready_respects_limit_oldest_first(store: SqlStore) -> None:
    now = time.time()
    runs = [await new_run(store, created_at=now - 10 + i) for i in range(4)]
    first = await store.claim_ready("me", now, 30, 2)
    assert sorted(first) == sorted(r.id for r in runs[:2])
    second = await store.claim_ready("me", now, 30, 10)
    assert sorted(second) == sorted(r.id for r in runs[2:])


async def test_renew_leases_reports_held_and_cancel(store: SqlStore) -> None:
    now = time.time()
    mine1, mine2, theirs = [await new_run(store) for _ in range(3)]
    assert await store.claim_run(mine1.id, "me", now, 10)
    assert await store.claim_run(mine2.id, "me", now, 10)
    assert await store.claim_run(theirs.id, "them", now, 10)
    await store.update_run(mine2.id, {"cancel_requested": True})

    held = await store.renew_leases("me", [mine1.id, mine2.id, theirs.id, "run_missing"], now + 99)
    assert held == {mine1.id: False, mine2.id: True}
    assert (await fetch(store, mine1.id)).lease_expires_at == now + 99
    assert (await fetch(store, theirs.id)).lease_expires_at == now + 10
    assert await store.renew_leases("me", [], now + 99) == {}


async def test_release_run_only_by_owner(store: SqlStore) -> None:
    now = time.time()
    run = await new_run(store)
    assert await store.claim_run(run.id, "me", now, 30)
    await store.release_run(run.id, "other")
    assert (await fetch(store, run.id)).owner == "me"
    await store.release_run(run.id, "me")
    got = await store.get_run(run.id)
    assert got is not None
    assert (got.owner, got.lease_expires_at) == (None, None)
    assert await store.claim_run(run.id, "other", now + 1, 30)


# -- steps -------------------------------------------------------------------------------


async def test_save_step_upsert_and_completed_is_final(store: SqlStore) -> None:
    run = await new_run(store)
    now = time.time()
    await store.save_step(make_step(run.id, "a", "waiting", started_at=now, detail={"prompt": "ok?"}))
    steps = await store.load_steps(run.id)
    assert steps["a"].status == "waiting"
    assert steps["a"].detail == {"prompt": "ok?"}
    assert steps["a"].output is None

    done = make_step(
        run.id, "a", "completed", started_at=now, finished_at=now + 1, output={"v": 1}, attempts=2
    )
    await store.save_step(done)
    steps = await store.load_steps(run.id)
    assert (steps["a"].status, steps["a"].output, steps["a"].attempts) == ("completed", {"v": 1}, 2)
    assert steps["a"].finished_at == now + 1

    # a completed record is never overwritten
    await store.save_step(make_step(run.id, "a", "failed", started_at=now, error={"message": "late"}))
    steps = await store.load_steps(run.id)
    assert steps["a"].status == "completed"
    assert steps["a"].error is None


async def test_load_and_delete_steps(store: SqlStore) -> None:
    run = await new_run(store)
    other = await new_run(store)
    now = time.time()
    for i, key in enumerate(["a", "loop#1/b", "par[x]/c"]):
        await store.save_step(make_step(run.id, key, started_at=now + i, output={"i": i}))
    await store.save_step(make_step(other.id, "a"))
    steps = await store.load_steps(run.id)
    assert list(steps) == ["a", "loop#1/b", "par[x]/c"]
    assert steps["loop#1/b"].step_id == "b"
    assert steps["par[x]/c"].output == {"i": 2}

    await store.delete_step(run.id, "loop#1/b")
    assert list(await store.load_steps(run.id)) == ["a", "par[x]/c"]
    assert list(await store.load_steps(other.id)) == ["a"]
    assert await store.load_steps("run_missing") == {}

    await store.delete_steps(run.id, ["a", "par[x]/c", "not-there"])
    assert await store.load_steps(run.id) == {}
    assert list(await store.load_steps(other.id)) == ["a"]


async def test_signal_once_is_sent_once_even_concurrently(store: SqlStore) -> None:
    run = await new_run(store)
    now = time.time()
    results = await asyncio.gather(
        *(store.send_signal_once(run.id, "approval:a", {"n": i}, now) for i in range(5))
    )
    assert sum(r is not None for r in results) == 1
    assert [s.name for s in await store.list_signals(run.id)] == ["approval:a"]
    # another run, or another name, is independent
    other = await new_run(store)
    assert await store.send_signal_once(other.id, "approval:a", None, now) is not None
    assert await store.send_signal_once(run.id, "approval:b", None, now) is not None
    assert await store.send_signal_once(run.id, "approval:a", None, now) is None


async def test_save_step_fenced_by_owner(store: SqlStore) -> None:
    run = await new_run(store)
    now = time.time()
    with pytest.raises(LeaseLostError):
        await store.save_step(make_step(run.id, "a"), owner="me")
    assert await store.load_steps(run.id) == {}
    assert await store.claim_run(run.id, "me", now, 30)
    await store.save_step(make_step(run.id, "a"), owner="me")
    assert list(await store.load_steps(run.id)) == ["a"]


async def test_load_state_reads_run_steps_signals(store: SqlStore) -> None:
    run = await new_run(store)
    await store.save_step(make_step(run.id, "a"))
    await store.send_signal(run.id, "event:go", {"v": 1}, time.time())
    got, steps, signals = await store.load_state(run.id)
    assert got is not None
    assert got.id == run.id
    assert list(steps) == ["a"]
    assert [(s.name, s.payload) for s in signals] == [("event:go", {"v": 1})]
    assert await store.load_state("run_missing") == (None, {}, [])


# -- signals -------------------------------------------------------------------------------


async def test_signal_wakes_waiting_run_and_is_consumed_once(store: SqlStore) -> None:
    waiting = await new_run(store, status="waiting", wake_at=None)
    running = await new_run(store, status="running")
    now = time.time()
    sid = await store.send_signal(waiting.id, "event:go", {"v": 1}, now)
    await store.send_signal(running.id, "event:go", None, now)
    assert (await fetch(store, waiting.id)).wake_at == now
    assert (await fetch(store, running.id)).wake_at is None
    # the woken run is now ready
    assert waiting.id in await store.claim_ready("me", now + 0.001, 30, 10)

    sid2 = await store.send_signal(waiting.id, "approval:a", {"approved": True}, now + 1)
    assert sid2 != sid
    signals = await store.list_signals(waiting.id)
    assert [(s.id, s.name, s.payload, s.consumed_at) for s in signals] == [
        (sid, "event:go", {"v": 1}, None),
        (sid2, "approval:a", {"approved": True}, None),
    ]
    assert await store.consume_signal(sid, now + 2)
    assert not await store.consume_signal(sid, now + 3)
    signals = await store.list_signals(waiting.id)
    assert signals[0].consumed_at == now + 2
    assert signals[1].consumed_at is None
    assert await store.list_signals("run_missing") == []


async def test_park_run_sees_signal_sent_earlier(store: SqlStore) -> None:
    run = await new_run(store)
    now = time.time()
    assert await store.claim_run(run.id, "me", now, 30)
    assert not await store.park_run(run.id, now, None, "event:w", ["event:go"])
    got = await store.get_run(run.id)
    assert got is not None
    assert (got.status, got.owner, got.waiting_on) == ("waiting", None, "event:w")

    assert await store.claim_run(run.id, "me", now, 30)
    await store.send_signal(run.id, "event:go", None, now)
    assert await store.park_run(run.id, now, now + 5, "event:w", ["event:go"])
    assert (await fetch(store, run.id)).wake_at == now + 5


async def test_completed_step_with_signal_id_consumes_signal(store: SqlStore) -> None:
    run = await new_run(store)
    now = time.time()
    sid = await store.send_signal(run.id, "event:go", 1, now)
    await store.save_step(make_step(run.id, "w", kind="wait", finished_at=now + 1, detail={"signal_id": sid}))
    (signal,) = await store.list_signals(run.id)
    assert signal.consumed_at == now + 1


# -- payloads -------------------------------------------------------------------------------


async def test_big_values_stored_once_in_payloads(store: SqlStore) -> None:
    big_input = {"doc": BIG, "n": 1}
    r1 = await new_run(store, input=big_input)
    r2 = await new_run(store, input=big_input)
    rows = await payload_rows(store)
    assert len(rows) == 1
    digest, size = rows[0]
    assert size > 16 * 1024
    for rid in (r1.id, r2.id):
        got = await store.get_run(rid)
        assert got is not None
        assert got.input == big_input
    assert await store.get_payload(digest) == big_input
    assert await store.get_payload("sha256:missing") is None

    # a big step output is moved out too, and read back equal (through load_steps and load_state)
    out = {"items": [BIG, "tail"]}
    await store.save_step(make_step(r1.id, "a", output=out, input=big_input))
    assert len(await payload_rows(store)) == 2
    steps = await store.load_steps(r1.id)
    assert steps["a"].output == out
    assert steps["a"].input == big_input
    _, state_steps, _ = await store.load_state(r1.id)
    assert state_steps["a"].output == out


async def test_small_values_stay_inline(store: SqlStore) -> None:
    await new_run(store, input={"doc": "y" * 1000})
    assert await payload_rows(store) == []


async def test_user_value_shaped_like_payload_ref_round_trips(store: SqlStore) -> None:
    # regression: _decode used to read any {"$payload": X} as a reference (NoResultFound)
    tricky = {"$payload": "sha256:not-a-real-digest"}
    run = await new_run(store, input=tricky)
    got = await store.get_run(run.id)
    assert got is not None
    assert got.input == tricky
    await store.save_step(make_step(run.id, "a", output=tricky))
    assert (await store.load_steps(run.id))["a"].output == tricky


async def test_signal_once_across_two_stores(store: SqlStore, store_url: str) -> None:
    """Two processes (two stores, two connections) racing to decide: the unique index picks one."""
    run = await new_run(store)
    second = await open_store(store_url)
    try:
        now = time.time()
        results = []
        for _ in range(20):
            name = f"approval:{len(results)}"
            results.append(
                await asyncio.gather(
                    store.send_signal_once(run.id, name, "a", now),
                    second.send_signal_once(run.id, name, "b", now),
                )
            )
        assert all(sum(r is not None for r in pair) == 1 for pair in results)
    finally:
        await second.close()
