"""Group commit: many concurrent calls share few transactions, and merged calls stay independent.

Runs on SQLite and PostgreSQL through the parametrised ``store`` fixture.
"""

from __future__ import annotations

import asyncio
import threading
import time

from controltower.store import SqlStore, WorkflowRecord

from .helpers import fetch, make_step, new_run

# -- group commit -----------------------------------------------------------------------------


async def test_group_commit_batches_concurrent_writes(store: SqlStore) -> None:
    run = await new_run(store)
    now = time.time()
    before = store.commits
    await asyncio.gather(
        *(store.save_step(make_step(run.id, f"s{i}", started_at=now + i)) for i in range(100))
    )
    used = store.commits - before
    assert 1 <= used <= 10, f"100 concurrent saves took {used} transactions"
    assert len(await store.load_steps(run.id)) == 100


async def test_failing_job_does_not_fail_its_batch(store: SqlStore) -> None:
    run = await new_run(store)
    now = time.time()
    gate = threading.Event()
    # hold the store thread so everything below is queued and drained as one batch
    blocker = store._committer.submit(lambda conn, args: [gate.wait(5)])
    bad = asyncio.ensure_future(store.publish("wf", {"bad": object()}, "d", None, now))
    saves = [asyncio.ensure_future(store.save_step(make_step(run.id, f"s{i}"))) for i in range(10)]
    good = asyncio.ensure_future(store.publish("wf", {"ok": True}, "d2", None, now))
    await asyncio.sleep(0.05)
    gate.set()
    assert await blocker is True
    results = await asyncio.gather(bad, *saves, good, return_exceptions=True)
    assert isinstance(results[0], TypeError)
    assert all(r is None for r in results[1:-1])
    published = results[-1]
    assert isinstance(published, WorkflowRecord)
    assert published.version == 1  # the failed publish left no version behind
    assert len(await store.load_steps(run.id)) == 10
    assert [w.digest for w in await store.list_workflows()] == ["d2"]


# -- batched calls keep each caller's own arguments ------------------------------------------------


async def test_batched_claims_use_each_callers_time(store: SqlStore) -> None:
    now = time.time()
    early, late = await new_run(store), await new_run(store)
    # "late" is held by someone whose lease ends at now + 50
    assert await store.claim_run(late.id, "other", now + 20, 30)
    won = await asyncio.gather(
        store.claim_run(early.id, "me", now, 30), store.claim_run(late.id, "me", now + 100, 30)
    )
    assert list(won) == [True, True]
    assert (await fetch(store, early.id)).lease_expires_at == now + 30
    assert (await fetch(store, late.id)).lease_expires_at == now + 130


async def test_batched_signals_use_each_callers_time(store: SqlStore) -> None:
    now = time.time()
    a = await new_run(store, status="waiting")
    b = await new_run(store, status="waiting")
    await asyncio.gather(
        store.send_signal(a.id, "event:x", None, now), store.send_signal(b.id, "event:x", None, now + 100)
    )
    assert (await fetch(store, a.id)).wake_at == now
    assert (await fetch(store, b.id)).wake_at == now + 100
    assert (await store.list_signals(b.id))[0].created_at == now + 100


async def test_batched_step_saves_consume_signals_at_their_own_time(store: SqlStore) -> None:
    now = time.time()
    a, b = await new_run(store), await new_run(store)
    sa_id = await store.send_signal(a.id, "event:x", None, now)
    sb_id = await store.send_signal(b.id, "event:x", None, now)
    await asyncio.gather(
        store.save_step(make_step(a.id, "w", kind="wait", finished_at=now + 1, detail={"signal_id": sa_id})),
        store.save_step(make_step(b.id, "w", kind="wait", finished_at=now + 2, detail={"signal_id": sb_id})),
    )
    assert (await store.list_signals(a.id))[0].consumed_at == now + 1
    assert (await store.list_signals(b.id))[0].consumed_at == now + 2
