"""Cron triggers: one run per tick across restarts and schedulers, missed-tick policies, time zones."""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from tests.triggers.helpers import runs_of, spec

from controltower.engine import EmbeddedEngine
from controltower.spec.models import CronTrigger
from controltower.store import RunFilter
from controltower.triggers._common import latest_published
from controltower.triggers.cron import CronEntry, CronScheduler, ticks_between

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 11, 23, 15, 0, tzinfo=UTC).timestamp()  # a five-minute boundary


async def publish(engine: EmbeddedEngine, name: str = "nightly", **cron: Any) -> list[CronEntry]:
    trigger = {"kind": "cron", "schedule": "*/5 * * * *", "input": {"source": "cron"}, **cron}
    await engine.publish(spec(name, triggers=[trigger]))
    entries = [e for p in await latest_published(engine.store) for e in CronEntry.of(p)]
    assert entries, "the published workflow has a cron trigger"
    return entries


async def test_one_run_per_tick_across_passes_and_a_restart(engine: EmbeddedEngine, store_url: str) -> None:
    entries = await publish(engine)
    first = await CronScheduler(engine).fire_due(entries, now=T0 + 10)
    assert [(f.tick_at, f.missed) for f in first] == [(T0, False)]
    assert await CronScheduler(engine).fire_due(entries, now=T0 + 20) == []
    async with await EmbeddedEngine.open(store_url) as restarted:
        assert await CronScheduler(restarted).fire_due(entries, now=T0 + 30) == []
        later = await CronScheduler(restarted).fire_due(entries, now=T0 + 301)
        assert [f.tick_at for f in later] == [T0 + 300]
        await restarted.drain()
    runs = await runs_of(engine.store, "nightly")
    assert len(runs) == 2
    assert sorted(r.idempotency_key for r in runs) == [
        "cron:" + entries[0].key + ":2026-11-23T15:00:00+00:00",
        "cron:" + entries[0].key + ":2026-11-23T15:05:00+00:00",
    ]
    assert all(r.input == {"source": "cron"} for r in runs)


async def test_competing_schedulers_on_one_store_start_one_run_per_tick(
    engine: EmbeddedEngine, store_url: str
) -> None:
    entries = await publish(engine)
    await CronScheduler(engine).fire_due(entries, now=T0 - 5)  # the cursor exists before the race
    others = [await EmbeddedEngine.open(store_url) for _ in range(3)]
    try:
        for step in range(1, 4):
            now = T0 + 300 * step + 1
            await asyncio.gather(*(CronScheduler(e).fire_due(entries, now=now) for e in [engine, *others]))
        for other in others:
            await other.drain()
    finally:
        for other in others:
            await other.close()
    runs = await engine.store.list_runs(RunFilter(workflow="nightly", limit=100))
    keys = [r.idempotency_key for r in runs]
    # 15:00 was missed by the time of the first race (run once by policy), then one per tick
    assert len(keys) == len(set(keys)) == 4
    times = sorted(k[-14:-9] for k in keys if k)
    assert times == ["15:00", "15:05", "15:10", "15:15"]


@pytest.mark.slow
@pytest.mark.postgres
async def test_scheduler_processes_sharing_postgresql_start_one_run_per_tick(pg_url: str) -> None:
    async with await EmbeddedEngine.open(pg_url) as engine:
        entries = await publish(engine)
        await CronScheduler(engine).fire_due(entries, now=T0 - 5)  # the schedule's cursor
    times = [str(T0 + 300 * k + 1) for k in range(1, 4)]
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.triggers.cron_worker",
            pg_url,
            *times,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(3)
    ]
    outputs = [await p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err.decode()[-2000:] for _, err in outputs]
    fired = [int(out.decode().split()[-1]) for out, _ in outputs]
    assert all(0 <= n <= 4 for n in fired)  # a process that saw the cursor move fires fewer
    async with await EmbeddedEngine.open(pg_url) as engine:
        runs = await runs_of(engine.store, "nightly")
    assert sorted(r.idempotency_key[-14:-9] for r in runs if r.idempotency_key) == [
        "15:00",
        "15:05",
        "15:10",
        "15:15",
    ]


@pytest.mark.parametrize(("policy", "expected"), [("skip", 1), ("run_once", 2), ("run_all", 6)])
async def test_missed_ticks_follow_the_policy(engine: EmbeddedEngine, policy: str, expected: int) -> None:
    entries = await publish(engine, missed=policy, max_catch_up=5)
    scheduler = CronScheduler(engine, grace=60)
    await scheduler.fire_due(entries, now=T0 + 1)  # fires 15:00, then the scheduler is down an hour
    fired = await scheduler.fire_due(entries, now=T0 + 3600 + 30)
    assert len(fired) == expected
    assert fired[-1].tick_at == T0 + 3600  # 16:00 is on time
    assert not fired[-1].missed
    if policy == "run_once":
        assert fired[0].tick_at == T0 + 3300  # the latest missed tick
        assert fired[0].missed
    if policy == "run_all":
        assert [f.tick_at for f in fired[:-1]] == [T0 + 300 * k for k in range(7, 12)]
    # the cursor moved past the skipped ticks: nothing more is due
    assert await scheduler.fire_due(entries, now=T0 + 3600 + 40) == []
    await engine.drain()
    assert len(await runs_of(engine.store, "nightly")) == 1 + expected


async def test_schedules_follow_their_time_zone(engine: EmbeddedEngine) -> None:
    paris = await publish(engine, name="paris", schedule="0 8 * * *", timezone="Europe/Paris")
    utc = await publish(engine, name="utc", schedule="0 8 * * *")
    at_seven_utc = datetime(2026, 11, 23, 7, 0, 20, tzinfo=UTC).timestamp()  # 08:00:20 in Paris (CET)
    scheduler = CronScheduler(engine)
    fired = await scheduler.fire_due([*paris, *utc], now=at_seven_utc)
    assert [(f.workflow, f.tick_at) for f in fired] == [("paris", at_seven_utc - 20)]
    summer = datetime(2026, 7, 1, 6, 0, tzinfo=UTC).timestamp()  # 08:00 in Paris (CEST)
    assert ticks_between(paris[0].trigger, summer - 1, summer, 5) == [summer]
    await engine.drain()


def test_bad_schedules_and_zones_are_spec_errors() -> None:
    with pytest.raises(ValidationError, match="not a valid cron expression"):
        CronTrigger(schedule="61 * * * *")
    with pytest.raises(ValidationError, match="unknown time zone"):
        CronTrigger(schedule="0 8 * * *", timezone="Mars/Olympus")
