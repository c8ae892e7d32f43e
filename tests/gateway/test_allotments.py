"""Budget allotments: priced calls take their price from a reserved share, caps stay exact."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from tests.gateway.test_fast_paths import make_gateway, req

from controltower.gateway.allotments import Allotments
from controltower.gateway.pipeline import ToolGateway
from controltower.gateway.tools import ExecContext, ToolDefinition
from controltower.store import SqlStore, open_store

ROOT = Path(__file__).resolve().parents[2]
PRICE = 7  # ops.priced_peek
OBJECT = {"type": "object"}


def small_allotments(gateway: ToolGateway, **kw: Any) -> Allotments:
    """Allotments of 8 calls, granted while the headroom holds 4 of them: caps are reached fast."""
    gateway.allotments = Allotments(gateway.budgets, **{"calls_per_grant": 8, "headroom_share": 4, **kw})
    return gateway.allotments


async def reservation_rows(store: SqlStore) -> dict[str, int]:
    def fn(conn: sa.Connection) -> dict[str, int]:
        rows = conn.execute(sa.text("SELECT status, count(*) FROM budget_reservations GROUP BY status"))
        return {status: int(n) for status, n in rows}

    return await store.run(fn)


async def test_calls_far_from_every_cap_reserve_nothing_of_their_own(store: SqlStore, store_url: str) -> None:
    """One reservation for many calls; every other process sees it while the calls run; each
    call is charged once with its record; what was not spent goes back."""
    gateway = await make_gateway(store)
    await gateway.budgets.set_cap("default", "workflow:ops", "micros", 10**12)
    other = await open_store(store_url)
    seen: list[int] = []

    async def look(args: dict[str, Any], ctx: ExecContext) -> dict[str, Any]:
        def fn(conn: sa.Connection) -> int:
            query = "SELECT reserved FROM budgets WHERE scope = 'workflow:ops' AND unit = 'micros'"
            return int(conn.execute(sa.text(query)).scalar_one())

        seen.append(await other.run(fn))
        return {"id": args["id"]}

    try:
        look_tool = ToolDefinition(name="ops.look", owner="ops", input_schema=OBJECT, cost_micros=PRICE)
        await gateway.registry.register(look_tool, look)
        assert (await gateway.call(req("ops.look", {"id": "warm"}, "warm"))).ok
        assert gateway.allotments.granted == 1
        before = store.commits
        for n in range(20):  # a third of it: the next one is reserved when half is spent
            result = await gateway.call(req("ops.look", {"id": str(n)}, f"s{n}"))
            assert result.ok, result
        per_call = (store.commits - before) / 20
        assert per_call == (1 if store.dialect == "sqlite" else 2)  # (lookup) + result, charge, audit
        assert gateway.allotments.granted == 1  # the same allotment served them all
        assert all(reserved >= PRICE for reserved in seen)  # visible to another store during each call
        usage = await gateway.budgets.usage("default", "workflow:ops", "micros")
        assert usage.used == 21 * PRICE
        assert usage.reserved == 64 * PRICE - 21 * PRICE  # the allotment's unspent rest

        # a chain that keeps calling gets its next allotment (twice as large) in the background,
        # before this one runs out: still no call waits for a reservation
        for n in range(20, 400):
            assert (await gateway.call(req("ops.look", {"id": str(n)}, f"s{n}"))).ok
        allotments = gateway.allotments
        assert allotments.granted - 1 == allotments.prefetched == 3  # 128, 256, 512 calls
        assert allotments.drawn == 401  # every call was charged from an allotment
        await gateway.flush()
        usage = await gateway.budgets.usage("default", "workflow:ops", "micros")
        assert (usage.used, usage.reserved) == (401 * PRICE, 0)
        assert await reservation_rows(store) == {"committed": 401, "released": 4}
    finally:
        await other.close()


async def test_close_to_a_cap_every_call_reserves_its_own(store: SqlStore) -> None:
    gateway = await make_gateway(store)
    await gateway.budgets.set_cap("default", "workflow:ops", "micros", 5000)  # < 16 allotments of 64 calls
    results = [await gateway.call(req("ops.pay", {"amount": 1}, f"s{n}")) for n in range(12)]
    assert [r.code for r in results].count("budget_exceeded") == 2
    assert gateway.allotments.granted == 0
    usage = await gateway.budgets.usage("default", "workflow:ops", "micros")
    assert (usage.used, usage.reserved) == (5000, 0)


async def test_concurrent_calls_of_one_gateway_spend_a_cap_exactly(store: SqlStore) -> None:
    """Allotments first, then (near the cap) calls one by one; a call refused while this gateway
    holds unspent allotments gets them back and tries again: exactly cap / price calls run."""
    gateway = await make_gateway(store)
    allotments = small_allotments(gateway)
    cap = 100 * PRICE
    await gateway.budgets.set_cap("default", "workflow:ops", "micros", cap)
    calls = [gateway.call(req("ops.priced_peek", {"id": str(n)}, f"s{n}")) for n in range(150)]
    results = await asyncio.gather(*calls)
    ok = sum(r.ok for r in results)
    assert {r.code for r in results if not r.ok} <= {"budget_exceeded"}
    assert allotments.granted >= 1
    assert ok == 100
    await gateway.flush()
    usage = await gateway.budgets.usage("default", "workflow:ops", "micros")
    assert (usage.used, usage.reserved) == (cap, 0)


async def test_two_gateways_never_pass_a_cap(store: SqlStore, store_url: str) -> None:
    """Two processes' gateways share one cap: together they never spend past it, every call that
    ran is charged exactly once, and nothing stays reserved once both are closed."""
    other_store = await open_store(store_url)
    try:
        first, second = await make_gateway(store), await make_gateway(other_store)
        for gateway in (first, second):
            small_allotments(gateway)
        cap = 100 * PRICE
        await first.budgets.set_cap("default", "workflow:ops", "micros", cap)
        calls = [
            gateway.call(req("ops.priced_peek", {"id": str(n)}, f"s{n}-{i}"))
            for n in range(75)
            for i, gateway in enumerate((first, second))
        ]
        results = await asyncio.gather(*calls)
        ok = sum(r.ok for r in results)
        assert {r.code for r in results if not r.ok} <= {"budget_exceeded"}
        usage = await first.budgets.usage("default", "workflow:ops", "micros")
        assert usage.used == ok * PRICE <= cap
        assert usage.used + usage.reserved <= cap
        # a call can be refused while the other gateway holds an allotment it has not spent
        # yet (at most ttl seconds): never more than one allotment of 8 calls per gateway
        assert ok >= 100 - 2 * 8
        await first.flush()
        await second.flush()
        usage = await first.budgets.usage("default", "workflow:ops", "micros")
        assert (usage.used, usage.reserved) == (ok * PRICE, 0)
    finally:
        await other_store.close()


async def test_failed_and_replayed_calls_give_their_price_back(store: SqlStore) -> None:
    gateway = await make_gateway(store)

    async def broken(args: dict[str, Any], ctx: ExecContext) -> dict[str, Any]:
        raise RuntimeError("upstream down")

    await gateway.registry.register(
        ToolDefinition(name="ops.broken", owner="ops", input_schema=OBJECT, cost_micros=PRICE), broken
    )
    assert (await gateway.call(req("ops.priced_peek", {"id": "a"}, "a"))).ok
    assert (await gateway.call(req("ops.priced_peek", {"id": "a"}, "a"))).replayed
    failed = await gateway.call(req("ops.broken", {}, "b"))
    assert failed.code == "tool_error"
    await gateway.flush()
    usage = await gateway.budgets.usage("default", "run:run-1", "micros")
    assert (usage.used, usage.reserved) == (PRICE, 0)


async def test_idle_allotments_go_back_by_themselves(store: SqlStore) -> None:
    gateway = await make_gateway(store)
    small_allotments(gateway, ttl=0.1)
    assert (await gateway.call(req("ops.priced_peek", {"id": "a"}, "a"))).ok
    usage = await gateway.budgets.usage("default", "run:run-1", "micros")
    assert usage.reserved == 7 * PRICE
    for _ in range(50):
        await asyncio.sleep(0.05)
        usage = await gateway.budgets.usage("default", "run:run-1", "micros")
        if usage.reserved == 0:
            break
    assert (usage.used, usage.reserved) == (PRICE, 0)


CRASHING_GATEWAY = textwrap.dedent(
    """
    import asyncio, os, sys
    sys.path.insert(0, {root!r})
    from tests.gateway.test_fast_paths import make_gateway, req
    from controltower.store import open_store

    async def main():
        store = await open_store({url!r})
        gateway = await make_gateway(store)
        result = await gateway.call(req("ops.priced_peek", {{"id": "a"}}, "crashed"))
        assert result.ok, result
        print("called", flush=True)
        os._exit(0)  # dies holding its allotment: no flush, no close

    asyncio.run(main())
    """
)


async def test_a_dead_gateways_allotment_is_given_back(store: SqlStore, store_url: str) -> None:
    code = CRASHING_GATEWAY.format(root=str(ROOT), url=store_url)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "called" in out.stdout
    gateway = await make_gateway(store)
    usage = await gateway.budgets.usage("default", "run:run-1", "micros")
    assert (usage.used, usage.reserved) == (PRICE, 63 * PRICE)  # held by the dead process
    gateway.allotments = Allotments(gateway.budgets, stale_after=0.0)
    assert (await gateway.call(req("ops.priced_peek", {"id": "b"}, "alive"))).ok  # grants: expires it
    await gateway.flush()
    usage = await gateway.budgets.usage("default", "run:run-1", "micros")
    assert (usage.used, usage.reserved) == (2 * PRICE, 0)
