"""Budgets: exact reservations on every level, idempotent by key, across coroutines and processes."""

from __future__ import annotations

import asyncio
import json
import threading
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa

from controltower.gateway.budgets import (
    BudgetExceeded,
    BudgetLedger,
    BudgetPolicy,
    BudgetUsage,
    Fallback,
    Stop,
    budget_scopes,
)
from controltower.spec.errors import ConflictError, InvalidInputError, NotFoundError
from controltower.spec.models import BudgetSpec
from controltower.store import SqlStore, open_store
from controltower.store import tables as t
from controltower.store.postgres import normalise_url

from .procs import Proc

SCOPES = budget_scopes("acme", department="sales", workflow="quotes", run="r1")
RUN, WORKFLOW, DEPARTMENT, TENANT = SCOPES


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def totals(ledger: BudgetLedger, scopes: list[str], unit: str = "micros") -> dict[str, tuple[int, int]]:
    out = {}
    for scope in scopes:
        u = await ledger.usage("acme", scope, unit)
        out[scope] = (u.used, u.reserved)
    return out


async def reservation_rows(store: SqlStore) -> int:
    return int(
        await store.run(
            lambda conn: conn.execute(
                sa.select(sa.func.count()).select_from(t.budget_reservations)
            ).scalar_one()
        )
    )


def test_scopes_are_narrowest_first() -> None:
    assert SCOPES == ["run:r1", "workflow:quotes", "department:sales", "tenant:acme"]
    assert budget_scopes("acme") == ["tenant:acme"]


async def test_reserve_then_commit_moves_the_reservation_to_used(store: SqlStore) -> None:
    ledger = BudgetLedger(store)
    await ledger.set_cap("acme", TENANT, "micros", 1000)
    res = await ledger.reserve("run1/step/0", "acme", SCOPES, "micros", 300)
    assert (res.status, res.amount, res.replayed) == ("reserved", 300, False)
    assert await totals(ledger, SCOPES) == {scope: (0, 300) for scope in SCOPES}
    assert await ledger.usage("acme", TENANT, "micros") == BudgetUsage(1000, 0, 300, 700, TENANT, "micros")

    done = await ledger.commit("run1/step/0", 250)  # less than reserved: the rest is returned
    assert (done.status, done.actual, done.overspend, done.charged) == ("committed", 250, 0, 250)
    assert await totals(ledger, SCOPES) == {scope: (250, 0) for scope in SCOPES}
    assert (await ledger.usage("acme", TENANT, "micros")).remaining == 750
    # track-only scopes were created on the fly, with no cap
    assert (await ledger.usage("acme", RUN, "micros")).cap is None
    assert (await ledger.usage("acme", RUN, "micros")).remaining is None


async def test_commit_more_than_reserved_charges_it_all_as_overspend(store: SqlStore) -> None:
    ledger = BudgetLedger(store)
    await ledger.set_cap("acme", RUN, "tokens", 100)
    await ledger.reserve("k", "acme", SCOPES, "tokens", 80)
    done = await ledger.commit("k", 130)
    assert (done.actual, done.overspend) == (130, 50)
    usage = await ledger.usage("acme", RUN, "tokens")
    assert (usage.used, usage.reserved, usage.remaining) == (130, 0, 0)
    with pytest.raises(BudgetExceeded) as info:  # the overspent budget refuses further calls
        await ledger.reserve("k2", "acme", SCOPES, "tokens", 0)
    assert info.value.over == 30


async def test_a_reservation_that_fits_the_run_but_not_the_department_charges_nothing(
    store: SqlStore,
) -> None:
    ledger = BudgetLedger(store)
    await ledger.set_cap("acme", RUN, "micros", 1_000)
    await ledger.set_cap("acme", DEPARTMENT, "micros", 100)
    other_run = budget_scopes("acme", department="sales", workflow="quotes", run="r0")
    await ledger.reserve("r0/a", "acme", other_run, "micros", 80)
    before = await totals(ledger, [*SCOPES, "run:r0"])

    with pytest.raises(BudgetExceeded) as info:
        await ledger.reserve("r1/a", "acme", SCOPES, "micros", 30)
    exc = info.value
    assert (exc.scope, exc.cap, exc.used, exc.reserved, exc.requested, exc.over) == (
        DEPARTMENT,
        100,
        0,
        80,
        30,
        10,
    )
    assert (exc.code, exc.unit, exc.tenant) == ("budget_exceeded", "micros", "acme")
    assert "department:sales" in exc.message
    assert "exceeded by 10 micros" in exc.message
    assert exc.hint
    assert "raise the micros cap of department:sales" in exc.hint

    assert await totals(ledger, [*SCOPES, "run:r0"]) == before  # nothing charged anywhere
    assert before[RUN] == (0, 0)
    assert await ledger.reservation("r1/a") is None
    assert await reservation_rows(store) == 1
    assert (await ledger.reserve("r1/b", "acme", SCOPES, "micros", 20)).status == "reserved"  # exactly fits


async def test_every_level_enforces_its_cap(store: SqlStore) -> None:
    ledger = BudgetLedger(store)
    for level in range(4):  # one tenant per level, capped there only
        tenant = f"t{level}"
        scopes = budget_scopes(tenant, department="sales", workflow="quotes", run="r1")
        await ledger.set_cap(tenant, scopes[level], "tokens", 10)
        await ledger.reserve(f"{tenant}/a", tenant, scopes, "tokens", 10)
        with pytest.raises(BudgetExceeded) as info:
            await ledger.reserve(f"{tenant}/b", tenant, scopes, "tokens", 1)
        assert info.value.scope == scopes[level]
        for scope in scopes:
            usage = await ledger.usage(tenant, scope, "tokens")
            assert (usage.used, usage.reserved) == (0, 10)
        await ledger.reserve(f"{tenant}/c", tenant, scopes, "micros", 10_000)  # another unit, another budget


async def test_release_returns_the_reservation_and_is_idempotent(store: SqlStore) -> None:
    ledger = BudgetLedger(store)
    await ledger.set_cap("acme", WORKFLOW, "micros", 500)
    await ledger.reserve("k", "acme", SCOPES, "micros", 500)
    released = await ledger.release("k")
    assert released is not None
    assert (released.status, released.charged, released.replayed) == (
        "released",
        0,
        False,
    )
    again = await ledger.release("k")
    assert again is not None
    assert (again.status, again.replayed) == ("released", True)
    assert await totals(ledger, SCOPES) == {scope: (0, 0) for scope in SCOPES}
    assert await ledger.release("never-reserved") is None

    # a released key can be reserved again: it is charged once more, exactly once
    res = await ledger.reserve("k", "acme", SCOPES, "micros", 400)
    assert (res.status, res.amount, res.replayed) == ("reserved", 400, False)
    assert (await ledger.reserve("k", "acme", SCOPES, "micros", 400)).replayed
    assert await totals(ledger, SCOPES) == {scope: (0, 400) for scope in SCOPES}


async def test_reserve_and_commit_are_idempotent_by_key(store: SqlStore) -> None:
    ledger = BudgetLedger(store)
    first = await ledger.reserve("k", "acme", SCOPES, "micros", 100)
    again = await ledger.reserve("k", "acme", list(reversed(SCOPES)), "micros", 100)
    assert again.replayed
    assert again.created_at == first.created_at
    assert await totals(ledger, SCOPES) == {scope: (0, 100) for scope in SCOPES}

    done = await ledger.commit("k", 90)
    twice = await ledger.commit("k", 70)  # a no-op returning the first result
    assert (twice.actual, twice.status, twice.replayed) == (90, "committed", True)
    assert twice.settled_at == done.settled_at
    after = await ledger.reserve("k", "acme", SCOPES, "micros", 100)  # a replay after the commit
    assert (after.status, after.replayed) == ("committed", True)
    released = await ledger.release("k")  # releasing a committed reservation changes nothing
    assert released is not None
    assert released.status == "committed"
    assert await totals(ledger, SCOPES) == {scope: (90, 0) for scope in SCOPES}


async def test_a_key_reused_for_another_budget_is_a_conflict(store: SqlStore) -> None:
    ledger = BudgetLedger(store)
    await ledger.reserve("k", "acme", SCOPES, "micros", 1)
    with pytest.raises(ConflictError, match="already used for tenant 'acme'"):
        await ledger.reserve("k", "acme", SCOPES, "tokens", 1)
    with pytest.raises(ConflictError):
        await ledger.reserve("k", "other", ["tenant:other"], "micros", 1)
    assert await totals(ledger, SCOPES, "tokens") == {scope: (0, 0) for scope in SCOPES}


async def test_commit_of_an_unknown_key_says_what_to_do(store: SqlStore) -> None:
    with pytest.raises(NotFoundError, match="no budget reservation with key 'nope'"):
        await BudgetLedger(store).commit("nope", 1)


async def test_invalid_arguments_are_refused_with_the_fix(store: SqlStore) -> None:
    ledger = BudgetLedger(store)
    with pytest.raises(InvalidInputError, match="invalid budget scope 'team:x'"):
        await ledger.reserve("k", "acme", ["team:x"], "micros", 1)
    with pytest.raises(InvalidInputError, match="unit must be one of micros, tokens"):
        await ledger.set_cap("acme", TENANT, "dollars", 1)
    with pytest.raises(InvalidInputError, match=">= 0"):
        await ledger.reserve("k", "acme", SCOPES, "micros", -1)
    with pytest.raises(InvalidInputError, match=">= 0"):
        await ledger.set_cap("acme", TENANT, "micros", -5)
    with pytest.raises(InvalidInputError, match="at least one scope"):
        await ledger.reserve("k", "acme", [], "micros", 1)
    with pytest.raises(InvalidInputError, match="not one string"):
        await ledger.reserve("k", "acme", TENANT, "micros", 1)
    assert await reservation_rows(store) == 0


async def test_set_cap_changes_only_the_cap_and_usages_lists_every_budget(store: SqlStore) -> None:
    ledger = BudgetLedger(store)
    await ledger.reserve("k", "acme", SCOPES, "micros", 70)
    await ledger.set_cap("acme", TENANT, "micros", 50)  # below what is reserved: allowed, refuses more
    assert await ledger.usage("acme", TENANT, "micros") == BudgetUsage(50, 0, 70, 0, TENANT, "micros")
    with pytest.raises(BudgetExceeded):
        await ledger.reserve("k2", "acme", SCOPES, "micros", 1)
    await ledger.set_cap("acme", TENANT, "micros", None)
    await ledger.reserve("k2", "acme", SCOPES, "micros", 1)
    await ledger.set_cap("acme", "department:hr", "tokens", 9)
    listed = await ledger.usages("acme")
    assert [(u.scope, u.unit, u.cap, u.reserved) for u in listed] == [
        ("department:hr", "tokens", 9, 0),
        (DEPARTMENT, "micros", None, 71),
        (RUN, "micros", None, 71),
        (TENANT, "micros", None, 71),
        (WORKFLOW, "micros", None, 71),
    ]
    assert await ledger.usages("nobody") == []
    assert await ledger.usage("acme", "run:unknown", "micros") == BudgetUsage(
        None, 0, 0, None, "run:unknown", "micros"
    )


async def test_200_concurrent_reservations_against_a_cap_of_150_are_exact(store: SqlStore) -> None:
    ledger = BudgetLedger(store)
    await ledger.set_cap("acme", DEPARTMENT, "tokens", 150)

    async def one(i: int) -> bool:
        scopes = budget_scopes("acme", department="sales", workflow="quotes", run=f"r{i % 7}")
        try:
            await ledger.reserve(f"call-{i}", "acme", scopes, "tokens", 1)
        except BudgetExceeded:
            return False
        return True

    results = await asyncio.gather(*(one(i) for i in range(200)))
    assert sum(results) == 150
    usage = await ledger.usage("acme", DEPARTMENT, "tokens")
    assert (usage.used, usage.reserved, usage.remaining) == (0, 150, 0)
    assert (await ledger.usage("acme", TENANT, "tokens")).reserved == 150
    runs = [await ledger.usage("acme", f"run:r{i}", "tokens") for i in range(7)]
    assert sum(u.reserved for u in runs) == 150
    assert await reservation_rows(store) == 150

    # settle concurrently too: half committed at 2, half released
    keys = [f"call-{i}" for i, ok in enumerate(results) if ok]
    await asyncio.gather(
        *(ledger.commit(k, 2) if n % 2 == 0 else ledger.release(k) for n, k in enumerate(keys)),
    )
    usage = await ledger.usage("acme", DEPARTMENT, "tokens")
    assert (usage.used, usage.reserved) == (150, 0)  # 75 commits of 2


async def test_concurrent_reservations_of_one_key_charge_once(store: SqlStore) -> None:
    ledger = BudgetLedger(store)
    results = await asyncio.gather(*(ledger.reserve("same", "acme", SCOPES, "micros", 10) for _ in range(50)))
    assert sum(not r.replayed for r in results) == 1
    assert {r.created_at for r in results} == {results[0].created_at}
    assert await totals(ledger, SCOPES) == {scope: (0, 10) for scope in SCOPES}
    commits = await asyncio.gather(*(ledger.commit("same", 7) for _ in range(20)))
    assert sum(not c.replayed for c in commits) == 1
    assert await totals(ledger, SCOPES) == {scope: (7, 0) for scope in SCOPES}


async def test_two_stores_racing_on_one_key_charge_once(store_url: str) -> None:
    """Two SqlStores (two connections, like two processes) reserve the same keys at once."""
    a, b = await open_store(store_url), await open_store(store_url)
    try:
        la, lb = BudgetLedger(a), BudgetLedger(b)
        keys = [f"k{i}" for i in range(30)]
        got = await asyncio.gather(
            *(ledger.reserve(k, "acme", SCOPES, "micros", 3) for k in keys for ledger in (la, lb))
        )
        assert sum(not r.replayed for r in got) == 30
        assert await totals(la, SCOPES) == {scope: (0, 90) for scope in SCOPES}
    finally:
        await a.close()
        await b.close()


async def test_expire_stale_releases_only_old_open_reservations(store: SqlStore) -> None:
    clock = FakeClock()
    ledger = BudgetLedger(store, clock=clock)
    await ledger.set_cap("acme", TENANT, "micros", 100)
    await ledger.reserve("crashed", "acme", SCOPES, "micros", 60)
    await ledger.reserve("finished", "acme", SCOPES, "micros", 10)
    await ledger.commit("finished", 10)
    clock.now += 100
    await ledger.reserve("recent", "acme", SCOPES, "micros", 20)
    with pytest.raises(BudgetExceeded):
        await ledger.reserve("blocked", "acme", SCOPES, "micros", 20)

    clock.now += 50
    assert await ledger.expire_stale(older_than=120) == 1  # only "crashed" is older than 120 s
    assert await ledger.expire_stale(older_than=120) == 0
    crashed = await ledger.reservation("crashed")
    assert crashed is not None
    assert crashed.status == "released"
    usage = await ledger.usage("acme", TENANT, "micros")
    assert (usage.used, usage.reserved) == (10, 20)
    await ledger.reserve("blocked", "acme", SCOPES, "micros", 20)

    # the crashed call's process comes back and commits after all: the money is still charged
    late = await ledger.commit("crashed", 55)
    assert (late.status, late.actual) == ("committed", 55)
    usage = await ledger.usage("acme", TENANT, "micros")
    assert (usage.used, usage.reserved) == (65, 40)

    clock.now += 1000
    assert await ledger.purge_settled(older_than=500) == 2  # crashed and finished
    assert await ledger.reservation("crashed") is None
    assert await ledger.reservation("recent") is not None


def _worker_stderr(tmp_path: Path, name: str) -> Path:
    return tmp_path / f"{name}.err"


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_crash_replay_after_sigkill_does_not_charge_twice(store_url: str, tmp_path: Path) -> None:
    await (await open_store(store_url)).close()  # migrated: the worker opens it without migrating
    worker = Proc("hold", store_url, "run-crash/step/0", "250", stderr=_worker_stderr(tmp_path, "hold"))
    try:
        first = json.loads(await asyncio.to_thread(worker.expect, "reserved "))
        worker.kill()  # the process dies between reserve and commit
    finally:
        worker.close()
    assert first["status"] == "reserved"

    store = await open_store(store_url)
    try:
        ledger = BudgetLedger(store)
        scopes = ["run:r-crash", "workflow:w", "tenant:t"]
        replay = await ledger.reserve("run-crash/step/0", "t", scopes, "micros", 250)
        assert replay.replayed
        assert replay.created_at == first["created_at"]
        assert replay.amount == 250
        usage = await ledger.usage("t", "tenant:t", "micros")
        assert (usage.used, usage.reserved) == (0, 250)
        done = await ledger.commit("run-crash/step/0", 240)
        assert (done.status, done.actual) == ("committed", 240)
        for scope in scopes:
            usage = await ledger.usage("t", scope, "micros")
            assert (usage.used, usage.reserved) == (240, 0)
    finally:
        await store.close()


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(90)
async def test_four_processes_on_postgres_never_pass_the_cap(pg_url: str, tmp_path: Path) -> None:
    cap, procs, per_proc = 100, 4, 40
    store = await open_store(pg_url)
    try:
        ledger = BudgetLedger(store)
        await ledger.set_cap("t", "department:d", "tokens", cap)
        await ledger.set_cap("t", "tenant:t", "tokens", 10_000)
    finally:
        await store.close()

    workers = [
        Proc("hammer", pg_url, str(i), str(per_proc), stderr=_worker_stderr(tmp_path, f"hammer{i}"))
        for i in range(procs)
    ]
    engine = sa.create_engine(normalise_url(pg_url), poolclass=sa.pool.NullPool)
    peak = 0
    stop = threading.Event()

    def watch() -> None:  # samples the department budget while the processes race
        nonlocal peak
        query = sa.text(
            "SELECT used + reserved FROM budgets WHERE scope = 'department:d' AND unit = 'tokens'"
        )
        with engine.connect() as conn:
            while not stop.is_set():
                peak = max(peak, int(conn.execute(query).scalar() or 0))
                conn.rollback()
                stop.wait(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    try:
        for w in workers:
            await asyncio.to_thread(w.expect, "ready")
        watcher.start()
        for w in workers:
            w.send()
        reserved = [json.loads(await asyncio.to_thread(w.expect, "reserved ")) for w in workers]
        stop.set()
        watcher.join(timeout=10)
        assert sum(r["ok"] for r in reserved) == cap
        assert sum(r["refused"] for r in reserved) == procs * per_proc - cap
        assert peak <= cap

        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT scope, used, reserved FROM budgets WHERE unit = 'tokens' ORDER BY scope")
            ).all()
        by_scope = {row.scope: (row.used, row.reserved) for row in rows}
        assert by_scope["department:d"] == (0, cap)
        assert by_scope["tenant:t"] == (0, cap)
        assert sum(v[1] for s, v in by_scope.items() if s.startswith("run:")) == cap

        for w in workers:
            w.send()
        settled = [json.loads(await asyncio.to_thread(w.expect, "settled ")) for w in workers]
        committed = sum(s["committed"] for s in settled)
        with engine.connect() as conn:
            row = conn.execute(
                sa.text("SELECT used, reserved FROM budgets WHERE scope = 'department:d' AND unit = 'tokens'")
            ).one()
            statuses = dict(
                conn.execute(
                    sa.text("SELECT status, count(*) FROM budget_reservations GROUP BY status")
                ).all()
            )
        assert (row.used, row.reserved) == (committed, 0)
        assert statuses == {"committed": committed, "released": cap - committed}
    finally:
        stop.set()
        for w in workers:
            w.close()
        engine.dispose()


def test_policy_stops_or_falls_back_once() -> None:
    exc = BudgetExceeded(tenant="acme", scope=RUN, unit="micros", cap=10, used=10, reserved=0, requested=5)
    stop = BudgetPolicy(max_tokens=1000).decide(exc)
    assert isinstance(stop, Stop)
    assert stop.kind == "stop"
    assert stop.exceeded is exc

    policy = BudgetPolicy.from_spec(
        BudgetSpec(
            max_tokens=5000, max_cost_usd=Decimal("1.25"), on_exceed="fallback", fallback_model="small"
        )
    )
    assert policy.caps() == {"tokens": 5000, "micros": 1_250_000}
    outcome = policy.decide(exc, model="large")
    assert isinstance(outcome, Fallback)
    assert (outcome.kind, outcome.model) == ("fallback", "small")
    assert isinstance(policy.decide(exc, model="small"), Stop)  # already on the fallback model

    assert BudgetPolicy.from_spec(None).caps() == {"tokens": None, "micros": None}
    with pytest.raises(InvalidInputError, match="needs fallback_model"):
        BudgetPolicy(on_exceed="fallback")


async def test_policy_installs_its_caps_on_a_scope(store: SqlStore) -> None:
    ledger = BudgetLedger(store)
    policy = BudgetPolicy.from_spec(BudgetSpec(max_tokens=100, max_cost_usd=Decimal("0.000050")))
    await policy.install(ledger, "acme", RUN)
    assert (await ledger.usage("acme", RUN, "tokens")).cap == 100
    assert (await ledger.usage("acme", RUN, "micros")).cap == 50
    with pytest.raises(BudgetExceeded) as info:
        await ledger.reserve("k", "acme", SCOPES, "micros", 51)
    assert isinstance(policy.decide(info.value), Stop)
