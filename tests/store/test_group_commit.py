"""Group commit: many concurrent calls share few transactions, and merged calls stay independent.

Runs on SQLite and PostgreSQL through the parametrised ``store`` fixture.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

from controltower.store import SqlStore, WorkflowRecord
from controltower.store import tables as t

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


# -- relaxed (visible, not yet durable) commits ----------------------------------------------------


def _durability(conn: Any) -> str:
    """How the current transaction will commit: SQLite's synchronous level, PostgreSQL's
    synchronous_commit (both readable inside a transaction)."""
    if conn.dialect.name == "sqlite":
        level = int(conn.exec_driver_sql("PRAGMA synchronous").scalar_one())
        return {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}[level]
    return str(conn.exec_driver_sql("SHOW synchronous_commit").scalar_one())


RELAXED = {"sqlite": "NORMAL", "postgresql": "off"}
DURABLE = {"sqlite": "FULL", "postgresql": "on"}


async def test_relaxed_job_commits_without_waiting_for_the_disk(store: SqlStore) -> None:
    relaxed, durable = RELAXED[store.dialect], DURABLE[store.dialect]
    before, relaxed_before = store.commits, store.relaxed_commits
    assert await store.run(_durability, durable=False) == relaxed
    assert store.relaxed_commits == relaxed_before + 1
    assert await store.run(_durability) == durable  # switched back for a durable job
    assert await store.run(_durability, durable=False) == relaxed
    assert store.commits == before + 3
    assert store.relaxed_commits == relaxed_before + 2


async def test_relaxed_job_batched_with_a_durable_one_commits_durably(store: SqlStore) -> None:
    relaxed, durable = RELAXED[store.dialect], DURABLE[store.dialect]
    started, gate = threading.Event(), threading.Event()

    def hold(conn: Any, args: list[Any]) -> list[Any]:
        started.set()
        return [gate.wait(5)]

    # hold the store thread (in a relaxed batch of its own) so that the next two are drained together
    blocker = store._committer.submit(hold, durable=False)
    assert await asyncio.to_thread(started.wait, 5)
    relaxed_before, commits_before = store.relaxed_commits, store.commits
    both = [
        asyncio.ensure_future(store.run(_durability, durable=False)),
        asyncio.ensure_future(store.run(_durability)),
    ]
    await asyncio.sleep(0.05)
    gate.set()
    assert await blocker is True
    assert await asyncio.gather(*both) == [durable, durable]
    assert store.commits == commits_before + 2  # the blocker's batch, then one for both
    assert store.relaxed_commits == relaxed_before + 1  # only the blocker's batch was relaxed
    # and a batch of relaxed jobs only is relaxed
    gate.clear()
    started.clear()
    blocker = store._committer.submit(hold)
    assert await asyncio.to_thread(started.wait, 5)
    pair = [asyncio.ensure_future(store.run(_durability, durable=False)) for _ in range(2)]
    await asyncio.sleep(0.05)
    gate.set()
    await blocker
    assert await asyncio.gather(*pair) == [relaxed, relaxed]


async def test_relaxed_commit_is_visible_to_another_store_at_once(store: SqlStore, store_url: str) -> None:
    from controltower.store import open_store

    run = await new_run(store)
    other = await open_store(store_url)
    try:
        stmt = t.runs.update().where(t.runs.c.id == run.id).values(status="paused")
        await store.run(lambda conn: conn.execute(stmt), durable=False)
        assert (await fetch(other, run.id)).status == "paused"
    finally:
        await other.close()


async def test_nothing_to_relax_when_every_commit_skips_the_fsync(tmp_path: Path) -> None:
    from controltower.store import open_store

    store = await open_store(f"sqlite:///{tmp_path / 'n.db'}", synchronous="NORMAL")
    try:
        assert await store.run(_durability, durable=False) == "NORMAL"
        assert await store.run(_durability) == "NORMAL"
        assert store.relaxed_commits == 0
    finally:
        await store.close()


# -- urgent jobs and commit hooks ---------------------------------------------------------------


async def test_urgent_job_goes_before_the_queued_ones_and_hooks_run_after_commit(store: SqlStore) -> None:
    """An urgent job commits before jobs queued earlier (not yet running), in a transaction of
    its own; ``on_commit`` sees the result on the store thread before the loop gets control."""
    gate = threading.Event()
    order: list[str] = []
    hooked: list[tuple[str, str]] = []
    blocker = store._committer.submit(lambda conn, args: [gate.wait(5)])

    def job(name: str) -> Any:
        def fn(conn: Any) -> str:
            order.append(name)
            return name

        return fn

    queued = [store.run_soon(job(f"queued-{i}")) for i in range(3)]
    urgent = store.run_soon(
        job("urgent"), urgent=True, on_commit=lambda r: hooked.append((r, threading.current_thread().name))
    )
    gate.set()
    await blocker
    assert await asyncio.gather(*queued, urgent) == ["queued-0", "queued-1", "queued-2", "urgent"]
    assert order == ["urgent", "queued-0", "queued-1", "queued-2"]
    assert hooked == [("urgent", "tower-store")]


async def test_urgent_job_wakes_an_idle_store_thread(store: SqlStore) -> None:
    assert await asyncio.wait_for(store.run_soon(lambda conn: 42, urgent=True), 5) == 42
