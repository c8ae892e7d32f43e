"""Subprocess for the multi-process budget and rate-limit tests: ``python budget_worker.py MODE URL ...``.

Each process opens its own store on the shared database. Modes:

- ``hammer URL IDX N``: prints ``ready``, waits for a stdin line, then reserves 1 token
  for N keys ``p{IDX}-{i}`` (10 at a time) on (run, workflow:w, department:d, tenant:t); prints
  ``reserved {json}``; waits for a second line, then commits the even keys (actual 1) and
  releases the odd ones, all at once; prints ``settled {json}``. The test migrates the store
  before starting workers (they open it with ``migrate=False``).
- ``hold URL KEY AMOUNT``: reserves KEY on (run:r-crash, workflow:w, tenant:t) in micros,
  prints ``reserved {json}`` and sleeps until killed (the crash-replay test SIGKILLs it).
- ``share URL KEY N``: prints ``ready``, waits for a line, then tries 15 tokens from bucket
  KEY (burst 10, almost no refill) without waiting, then runs N calls at once that each hold
  one of 3 slots of KEY briefly; prints ``shared {json}`` with the tokens it got and the most
  slots in use seen from inside a slot (counting the other processes' holders too).
- ``slot URL KEY LEASE``: takes one concurrency slot of KEY (limit 1) with a LEASE-second
  lease, prints ``held``, and sleeps until killed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys

from controltower.gateway.budgets import BudgetExceeded, BudgetLedger
from controltower.gateway.ratelimit import RateLimited, RateLimiter
from controltower.gateway.tools import RateLimit
from controltower.store import open_store


def say(text: str) -> None:
    print(text, flush=True)


async def wait_line() -> None:
    await asyncio.to_thread(sys.stdin.readline)


async def hammer(url: str, idx: int, n: int) -> None:
    store = await open_store(url, migrate=False)  # the test migrated it
    ledger = BudgetLedger(store)
    keys = [f"p{idx}-{i}" for i in range(n)]

    async def one(key: str, i: int) -> bool:
        scopes = [f"run:p{idx}-{i % 4}", "workflow:w", "department:d", "tenant:t"]
        try:
            await ledger.reserve(key, "t", scopes, "tokens", 1)
        except BudgetExceeded:
            return False
        return True

    say("ready")
    await wait_line()
    ok: list[bool] = []
    for start in range(0, n, 10):  # waves of 10: many transactions, interleaved with the other processes
        ok += await asyncio.gather(*(one(keys[i], i) for i in range(start, min(start + 10, n))))
    say("reserved " + json.dumps({"ok": sum(ok), "refused": len(ok) - sum(ok)}))
    await wait_line()
    mine = [(i, key) for i, (key, got) in enumerate(zip(keys, ok, strict=True)) if got]
    await asyncio.gather(*(ledger.commit(key, 1) if i % 2 == 0 else ledger.release(key) for i, key in mine))
    committed = sum(1 for i, _ in mine if i % 2 == 0)
    say("settled " + json.dumps({"committed": committed, "released": len(mine) - committed}))
    await store.close()


async def hold(url: str, key: str, amount: int) -> None:
    store = await open_store(url, migrate=False)  # the test migrated it
    res = await BudgetLedger(store).reserve(
        key, "t", ["run:r-crash", "workflow:w", "tenant:t"], "micros", amount
    )
    say("reserved " + json.dumps(dataclasses.asdict(res)))
    await asyncio.sleep(3600)


async def share(url: str, key: str, n: int) -> None:
    store = await open_store(url, migrate=False)  # the test migrated it
    limiter = RateLimiter(store)
    say("ready")
    await wait_line()

    bucket = RateLimit(per_second=1e-6, burst=10)
    acquired = 0
    for _ in range(15):
        try:
            await limiter.acquire(key, bucket, wait=False)
        except RateLimited:
            continue
        acquired += 1

    peak = done = 0

    async def call(i: int) -> None:
        nonlocal peak, done
        async with limiter.slot(key, 3, f"{os.getpid()}-{i}", timeout=30):
            peak = max(peak, await limiter.in_use(key))
            await asyncio.sleep(0.005)
        done += 1

    await asyncio.gather(*(call(i) for i in range(n)))
    say("shared " + json.dumps({"acquired": acquired, "peak": peak, "done": done}))
    await store.close()


async def slot(url: str, key: str, lease: float) -> None:
    store = await open_store(url, migrate=False)  # the test migrated it
    async with RateLimiter(store).slot(key, 1, "crashed-holder", lease=lease):
        say("held")
        await asyncio.sleep(3600)


def main(argv: list[str]) -> None:
    mode, url, *rest = argv
    if mode == "hammer":
        asyncio.run(hammer(url, int(rest[0]), int(rest[1])))
    elif mode == "hold":
        asyncio.run(hold(url, rest[0], int(rest[1])))
    elif mode == "share":
        asyncio.run(share(url, rest[0], int(rest[1])))
    elif mode == "slot":
        asyncio.run(slot(url, rest[0], float(rest[1])))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
