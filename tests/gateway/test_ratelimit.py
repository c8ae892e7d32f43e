"""Rate limits and concurrency slots, shared through the store (and so between processes)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import sqlalchemy as sa

from controltower.gateway.ratelimit import ConcurrencyLimited, RateLimited, RateLimiter
from controltower.gateway.tools import RateLimit
from controltower.spec.errors import InvalidInputError
from controltower.store import SqlStore, open_store
from controltower.store import tables as t

from .procs import Proc


class FakeClock:
    """Wall time that only moves when told to, or when the limiter sleeps."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limiter(store: SqlStore, clock: FakeClock) -> RateLimiter:
    return RateLimiter(store, clock, sleep=clock.sleep)


async def taken(limiter: RateLimiter, key: str, rate: RateLimit, n: int) -> int:
    got = 0
    for _ in range(n):
        try:
            await limiter.acquire(key, rate, wait=False)
        except RateLimited:
            continue
        got += 1
    return got


async def test_burst_then_refill_at_the_configured_rate(limiter: RateLimiter, clock: FakeClock) -> None:
    rate = RateLimit(per_second=2, burst=3)
    assert await taken(limiter, "acme/search", rate, 5) == 3  # the burst, then empty

    with pytest.raises(RateLimited) as info:
        await limiter.acquire("acme/search", rate, wait=False)
    assert info.value.retry_after == pytest.approx(0.5)
    assert info.value.code == "rate_limited"
    assert info.value.key == "acme/search"
    assert "rate limit of 'acme/search' reached (2.0/s, burst 3)" in info.value.message
    assert "next call allowed in 0.500s" in info.value.message

    clock.now += 0.25  # half a token
    with pytest.raises(RateLimited) as info:
        await limiter.acquire("acme/search", rate, wait=False)
    assert info.value.retry_after == pytest.approx(0.25)
    clock.now += 0.25
    await limiter.acquire("acme/search", rate, wait=False)
    assert await taken(limiter, "acme/search", rate, 1) == 0

    clock.now += 60  # a long pause refills only up to the burst
    assert await taken(limiter, "acme/search", rate, 10) == 3
    assert clock.slept == []  # wait=False never sleeps


async def test_buckets_are_per_key_and_burst_defaults_to_the_rate(limiter: RateLimiter) -> None:
    rate = RateLimit(per_second=2.5)  # burst ceil(2.5) = 3
    assert await taken(limiter, "a", rate, 10) == 3
    assert await taken(limiter, "b", rate, 10) == 3
    unlimited = RateLimit(concurrency=2)  # no per_second: acquire takes nothing
    assert await taken(limiter, "a", unlimited, 50) == 50


async def test_wait_sleeps_until_the_next_token_is_due(limiter: RateLimiter, clock: FakeClock) -> None:
    rate = RateLimit(per_second=4, burst=1)
    start = clock.now
    await limiter.acquire("k", rate)
    await limiter.acquire("k", rate)  # waits ~0.25 s (+ at most 10.5 ms jitter) for the refill
    await limiter.acquire("k", rate)
    assert len(clock.slept) == 2
    assert all(0.25 <= s <= 0.25 + 0.0255 for s in clock.slept), clock.slept
    assert 0.5 <= clock.now - start <= 0.56


async def test_wait_gives_up_when_no_token_can_come_before_the_timeout(
    limiter: RateLimiter, clock: FakeClock
) -> None:
    rate = RateLimit(per_second=1, burst=1)
    await limiter.acquire("k", rate)
    with pytest.raises(RateLimited) as info:
        await limiter.acquire("k", rate, timeout=0.5)
    assert info.value.retry_after == pytest.approx(1.0)
    assert clock.slept == []  # no pointless sleep: the token is due after the deadline
    await limiter.acquire("k", rate, timeout=1.5)
    assert len(clock.slept) == 1


async def test_a_clock_behind_the_bucket_never_refills_or_drains(
    limiter: RateLimiter, clock: FakeClock
) -> None:
    rate = RateLimit(per_second=1, burst=2)
    assert await taken(limiter, "k", rate, 1) == 1  # 1 token left
    clock.now -= 100  # another process's clock, 100 s behind
    assert await taken(limiter, "k", rate, 5) == 1
    clock.now += 101  # one second after the bucket's last update: one token
    assert await taken(limiter, "k", rate, 5) == 1


async def test_concurrency_limit_is_never_exceeded(store: SqlStore) -> None:
    limiter = RateLimiter(store)
    in_flight = peak = done = 0

    async def call(i: int) -> None:
        nonlocal in_flight, peak, done
        async with limiter.slot("acme/crm", 3, f"call-{i}", timeout=20):
            in_flight += 1
            peak = max(peak, in_flight)
            assert await limiter.in_use("acme/crm") <= 3
            await asyncio.sleep(0.01)
            in_flight -= 1
        done += 1

    await asyncio.gather(*(call(i) for i in range(20)))
    assert (peak, done) == (3, 20)
    assert await limiter.in_use("acme/crm") == 0


async def test_a_crashed_holders_slot_is_reclaimed_after_its_lease(
    limiter: RateLimiter, clock: FakeClock
) -> None:
    def crashed(conn: sa.Connection) -> None:  # a process died holding the only slot
        conn.execute(t.tool_slots.insert().values(key="k", holder="dead", expires_at=clock.now + 30))

    await limiter._store.run(crashed)
    with pytest.raises(ConcurrencyLimited) as info:
        async with limiter.slot("k", 1, "me", wait=False):
            pass
    assert info.value.code == "concurrency_limited"
    assert "all 1 concurrency slots of 'k' are in use" in info.value.message

    clock.now += 31
    async with limiter.slot("k", 1, "me", wait=False) as handle:
        assert (handle.holder, handle.lost) == ("me", False)
        assert await limiter.in_use("k") == 1
    assert await limiter.in_use("k") == 0


async def test_the_slot_is_freed_on_error_and_on_cancellation(store: SqlStore) -> None:
    limiter = RateLimiter(store)
    with pytest.raises(ZeroDivisionError):
        async with limiter.slot("k", 1):
            _ = 1 / 0
    assert await limiter.in_use("k") == 0

    inside = asyncio.Event()

    async def hold() -> None:
        async with limiter.slot("k", 1):
            inside.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(hold())
    await inside.wait()
    assert await limiter.in_use("k") == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await limiter.in_use("k") == 0

    # cancelled while waiting for a slot: nothing is left behind either
    async with limiter.slot("k", 1):
        waiter = asyncio.create_task(limiter.slot("k", 1).__aenter__())
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    await asyncio.sleep(0.01)
    assert await limiter.in_use("k") == 0


async def test_waiting_for_a_slot_times_out(store: SqlStore) -> None:
    limiter = RateLimiter(store)
    async with limiter.slot("k", 1, "first"):
        with pytest.raises(ConcurrencyLimited):
            async with limiter.slot("k", 1, "second", timeout=0.05):
                pass
    async with limiter.slot("k", 1, "second", timeout=0.05):
        pass


async def test_a_long_call_keeps_its_slot_by_renewing_the_lease(store: SqlStore) -> None:
    limiter = RateLimiter(store)
    async with limiter.slot("k", 1, "long", lease=0.3) as handle:
        await asyncio.sleep(0.75)  # two and a half leases
        with pytest.raises(ConcurrencyLimited):
            async with limiter.slot("k", 1, "other", wait=False):
                pass
        assert not handle.lost
    assert await limiter.in_use("k") == 0


async def test_guard_applies_rate_and_concurrency(limiter: RateLimiter) -> None:
    rate = RateLimit(per_second=1, burst=2, concurrency=1)
    async with limiter.guard("k", rate, "a"):
        assert await limiter.in_use("k") == 1
    async with limiter.guard("k", rate, "b"):
        pass
    with pytest.raises(RateLimited):  # the two tokens are gone
        async with limiter.guard("k", rate, "c", timeout=0.1):
            pass
    async with limiter.guard("k", None):
        pass


async def test_invalid_arguments_say_what_to_fix(limiter: RateLimiter) -> None:
    with pytest.raises(InvalidInputError, match="limit must be >= 1"):
        async with limiter.slot("k", 0):
            pass
    with pytest.raises(InvalidInputError, match="1 to 300 characters"):
        await limiter.acquire("x" * 301, RateLimit(per_second=1))


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_a_killed_processes_slot_is_reclaimed(store_url: str, tmp_path: Path) -> None:
    store = await open_store(store_url)
    holder = Proc("slot", store_url, "shared/tool", "1.0", stderr=tmp_path / "slot.err")
    try:
        limiter = RateLimiter(store)
        await asyncio.to_thread(holder.expect, "held")
        with pytest.raises(ConcurrencyLimited):
            async with limiter.slot("shared/tool", 1, wait=False):
                pass
        holder.kill()
        loop = asyncio.get_running_loop()
        start = loop.time()
        async with limiter.slot("shared/tool", 1, timeout=10):
            waited = loop.time() - start
        assert waited <= 3.0  # the 1 s lease, not the 10 s timeout
    finally:
        holder.close()
        await store.close()


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(60)
async def test_two_processes_share_buckets_and_slots_on_postgres(pg_url: str, tmp_path: Path) -> None:
    await (await open_store(pg_url)).close()  # migrated: the workers open it without migrating
    workers = [
        Proc("share", pg_url, "acme/vendor", "40", stderr=tmp_path / f"share{i}.err") for i in range(2)
    ]
    try:
        for w in workers:
            await asyncio.to_thread(w.expect, "ready")
        for w in workers:
            w.send()
        results = [json.loads(await asyncio.to_thread(w.expect, "shared ")) for w in workers]
    finally:
        for w in workers:
            w.close()
    assert sum(r["acquired"] for r in results) == 10  # burst 10, refill 1e-6/s: exactly 10 in total
    assert [r["done"] for r in results] == [40, 40]
    assert max(r["peak"] for r in results) == 3  # all three slots used, never a fourth
