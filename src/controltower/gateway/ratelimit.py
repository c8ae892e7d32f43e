"""Per-tool rate limits (token buckets) and concurrency slots, kept in the store.

Why in the store: several engine processes sharing one PostgreSQL database call the same
tools, and a vendor's limit is per account, not per process. On SQLite the single writer
serialises everything; on PostgreSQL each operation is one atomic statement or holds a
per-key advisory transaction lock.

- :meth:`RateLimiter.acquire` takes one token with ONE upsert whose refill is computed in
  SQL (``tokens = min(burst, tokens + elapsed * rate) - 1 ... WHERE that >= 1``): one
  store round trip when a token is available. If none is, it sleeps until the next token
  is due (plus jitter, so waiters in several processes do not stampede) and tries again.
- :meth:`RateLimiter.slot` is an ``async with`` that holds one of ``limit`` rows in
  ``tool_slots`` for a key. Rows carry a lease: a crashed holder's row expires and is
  reclaimed by the next caller. While the block runs, the lease is renewed every third of
  its length, so a long call keeps its slot; if the event loop is blocked for longer than
  the lease, another caller may take the slot (the holder is told: ``SlotHandle.lost``).

Times are wall-clock epoch seconds (shared between processes); a clock running behind
another process's never refills negatively.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from controltower.gateway.tools import RateLimit
from controltower.spec.errors import InvalidInputError, TowerError
from controltower.store import SqlStore
from controltower.store import tables as t

log = logging.getLogger("controltower.gateway")
T = TypeVar("T")

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

_MIN_POLL = 0.002
_MAX_POLL = 0.1


# -- shared with budgets.py: PostgreSQL advisory locks and deadlock retries -------------

# lock namespaces (first key of pg_advisory_xact_lock(int, int)): "CTbg", "CTsl"
BUDGET_LOCK_CLASS = 0x43546267
SLOT_LOCK_CLASS = 0x4354736C
PG_LOCK = sa.text("SELECT pg_advisory_xact_lock(:cls, hashtext(:key))")
_RETRY_SQLSTATES = frozenset({"40P01", "40001"})  # deadlock detected, serialization failure


async def run_retrying(
    store: SqlStore, fn: Callable[[Connection], T], attempts: int = 6, *, durable: bool = True
) -> T:
    """``store.run(fn, durable=durable)``, retried when PostgreSQL aborts the transaction as a
    deadlock victim.

    Group commit puts several jobs in one transaction, so two processes' batches can take
    the same locks in different orders; PostgreSQL then aborts one. The committer re-runs
    a failed batch's jobs alone, but a job that was alone gets the error: retry it here.
    ``fn`` has no side effects outside the database, so running it again is safe.
    """
    for attempt in range(attempts):
        try:
            return await store.run(fn, durable=durable)
        except sa.exc.DBAPIError as exc:
            state = getattr(exc.orig, "sqlstate", None)
            if state not in _RETRY_SQLSTATES or attempt + 1 >= attempts:
                raise
            await asyncio.sleep(random.uniform(0.001, 0.005) * (attempt + 1))
    raise AssertionError("unreachable")  # pragma: no cover


class RateLimited(TowerError):
    """No token in the tool's bucket in time. ``retry_after``: seconds until one is due."""

    code = "rate_limited"

    def __init__(self, key: str, retry_after: float, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.key = key
        self.retry_after = retry_after


class ConcurrencyLimited(RateLimited):
    """Every concurrency slot of the tool stayed taken until the timeout."""

    code = "concurrency_limited"


def _rate(rate: RateLimit) -> tuple[float, float] | None:
    """(per_second, burst) of a bucket, or None when the tool has no rate limit."""
    if rate.per_second is None:
        return None
    burst = rate.burst if rate.burst is not None else max(1, math.ceil(rate.per_second))
    return float(rate.per_second), float(burst)


def _burst(rate: RateLimit) -> int:
    params = _rate(rate)
    return 0 if params is None else int(params[1])


@dataclass(frozen=True, slots=True)
class _Gate:
    """This process's queue of calls waiting for a slot of one key."""

    loop: asyncio.AbstractEventLoop
    lock: asyncio.Lock  # held by the one waiter polling the store
    freed: asyncio.Event  # set when a slot of the key is released in this process


def _full(handle: SlotHandle, limit: int, retry_after: float) -> ConcurrencyLimited:
    return ConcurrencyLimited(
        handle.key,
        retry_after,
        f"all {limit} concurrency slots of {handle.key!r} are in use",
        hint="retry later, or raise the tool's rate_limit.concurrency",
    )


@dataclass(slots=True)
class SlotHandle:
    """What ``async with limiter.slot(...) as handle`` yields."""

    key: str
    holder: str
    lease: float
    lost: bool = False  # the lease ran out and the row was gone at a renewal


class RateLimiter:
    """Token buckets and concurrency slots shared by every process using the store."""

    def __init__(self, store: SqlStore, clock: Clock = time.time, *, sleep: Sleep = asyncio.sleep) -> None:
        self._store = store
        self._clock = clock
        self._sleep = sleep
        self._pg = store.dialect == "postgresql"
        self._take = _take_statement(store.insert)
        self._gates: dict[str, _Gate] = {}
        self._prefix = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._seq = 0

    # -- token buckets -------------------------------------------------------

    async def try_acquire(self, key: str, rate: RateLimit) -> float:
        """Take a token if one is there: 0.0 when taken, else seconds until the next is due."""
        params = _rate(rate)
        if params is None:
            return 0.0
        _check_key(key)
        per_second, burst = params

        def fn(conn: Connection) -> float:
            now = self._clock()
            values = {"b_key": key, "now": now, "rate": per_second, "burst": burst}
            if conn.execute(self._take, values).first() is not None:
                return 0.0
            row = conn.execute(_BUCKET, {"b_key": key}).one()
            tokens, updated_at = float(row.tokens), float(row.updated_at)
            level = min(burst, tokens + max(0.0, now - updated_at) * per_second)
            return max((1.0 - level) / per_second, 1e-6)

        return await run_retrying(self._store, fn)

    async def acquire(
        self, key: str, rate: RateLimit, *, wait: bool = True, timeout: float | None = None
    ) -> None:
        """Take one token from bucket ``key`` (refilled at ``per_second`` up to ``burst``).

        Without a token: ``wait=False`` raises :class:`RateLimited` at once; otherwise sleep
        until the next token is due and retry, raising once it cannot come before ``timeout``.
        A limit without ``per_second`` takes nothing (concurrency is :meth:`slot`'s job).
        """
        retry_after = await self.try_acquire(key, rate)
        if retry_after == 0.0:
            return
        deadline = None if timeout is None else self._clock() + timeout
        while True:
            now = self._clock()
            if not wait or (deadline is not None and now + retry_after > deadline):
                raise RateLimited(
                    key,
                    retry_after,
                    f"rate limit of {key!r} reached ({rate.per_second}/s, burst {_burst(rate)}): "
                    f"next call allowed in {retry_after:.3f}s",
                    hint="retry later, or raise the tool's rate_limit if the vendor allows it",
                )
            jitter = random.uniform(0.0, min(0.01, 0.1 * retry_after) + 0.0005)
            pause = retry_after + jitter
            if deadline is not None:
                pause = min(pause, max(0.0, deadline - now))
            await self._sleep(pause)
            retry_after = await self.try_acquire(key, rate)
            if retry_after == 0.0:
                return

    # -- concurrency slots ---------------------------------------------------

    def holder_id(self) -> str:
        """A holder name unique to this call in this process (when the caller has none)."""
        self._seq += 1
        return f"{self._prefix}:{self._seq}"

    @contextlib.asynccontextmanager
    async def slot(
        self,
        key: str,
        limit: int,
        holder: str | None = None,
        lease: float = 30.0,
        *,
        wait: bool = True,
        timeout: float | None = None,
    ) -> AsyncIterator[SlotHandle]:
        """Hold one of ``limit`` concurrency slots of ``key`` while the block runs.

        ``holder`` names this call (e.g. its call key) and must be unique among calls in
        flight: a holder entering again takes over its own old row (a replay after a crash).
        While all slots are taken, the process's waiters queue in order and the first polls
        the store with backoff (2 ms doubling to 100 ms), woken at once by a release in this
        process; a newcomer may still take a slot freed before the queue sees it. ``wait=False``
        or ``timeout`` (seconds) raise :class:`ConcurrencyLimited`. The row is deleted on exit,
        also on error or cancellation.
        """
        _check_key(key)
        if limit < 1:
            raise InvalidInputError(f"concurrency limit must be >= 1, got {limit}")
        if lease <= 0:
            raise InvalidInputError(f"slot lease must be > 0 seconds, got {lease}")
        who = holder or self.holder_id()
        if len(who) > 600:
            raise InvalidInputError("slot holder must be at most 600 characters")
        handle = SlotHandle(key, who, lease)
        await self._enter(handle, limit, wait, timeout)
        renewer = _Renewer(self, handle)
        try:
            yield handle
        finally:
            renewer.stop()
            await self._exit(handle)

    async def _enter(self, handle: SlotHandle, limit: int, wait: bool, timeout: float | None) -> None:
        if await self._try_enter(handle, limit):  # the fast path: concurrent callers share a batch
            return
        if not wait:
            raise _full(handle, limit, _MIN_POLL)
        gate = self._gate(handle.key)
        poll = _MIN_POLL
        try:
            async with asyncio.timeout(timeout), gate.lock:
                # the tool is full: one waiter per key and process polls the store, the others
                # queue here in order (a full tool costs one query per poll, not one per call)
                while True:
                    gate.freed.clear()
                    if await self._try_enter(handle, limit):
                        return
                    # woken early by a release in this process; other processes' are polled
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(poll * random.uniform(0.5, 1.0)):
                            await gate.freed.wait()
                    poll = min(poll * 2, _MAX_POLL)
        except TimeoutError:
            raise _full(handle, limit, poll) from None

    def _gate(self, key: str) -> _Gate:
        loop = asyncio.get_running_loop()
        gate = self._gates.get(key)
        if gate is None or gate.loop is not loop:
            gate = self._gates[key] = _Gate(loop, asyncio.Lock(), asyncio.Event())
        return gate

    async def _try_enter(self, handle: SlotHandle, limit: int) -> bool:
        def fn(conn: Connection) -> bool:
            now = self._clock()
            params = {"b_key": handle.key, "b_holder": handle.holder, "now": now}
            if self._pg:
                conn.execute(PG_LOCK, {"cls": SLOT_LOCK_CLASS, "key": handle.key})
            conn.execute(_SLOT_PURGE, params)  # expired rows of crashed holders, and our own old row
            taken = conn.execute(_SLOT_TAKE, {**params, "exp": now + handle.lease, "limit": limit}).first()
            return taken is not None

        try:
            return await run_retrying(self._store, fn)
        except asyncio.CancelledError:
            # the queued insert may still commit; the store runs jobs in order, so a delete
            # queued now runs after it and frees the slot we will never use
            _background(self._exit(handle))
            raise

    async def _exit(self, handle: SlotHandle) -> None:
        def fn(conn: Connection) -> None:
            conn.execute(_SLOT_FREE, {"b_key": handle.key, "b_holder": handle.holder})

        # shielded: a second cancellation must not skip the delete (the job is queued anyway)
        await asyncio.shield(run_retrying(self._store, fn))
        gate = self._gates.get(handle.key)
        if gate is not None and gate.loop is asyncio.get_running_loop():
            gate.freed.set()

    async def renew(self, handle: SlotHandle) -> bool:
        """Push the slot's lease ``lease`` seconds ahead; False if the row is gone."""

        def fn(conn: Connection) -> bool:
            values = {"b_key": handle.key, "b_holder": handle.holder, "exp": self._clock() + handle.lease}
            return bool(conn.execute(_SLOT_RENEW, values).rowcount == 1)

        return await run_retrying(self._store, fn)

    async def in_use(self, key: str) -> int:
        """Unexpired slots of ``key`` (for monitoring and tests)."""

        def fn(conn: Connection) -> int:
            return int(conn.execute(_SLOT_COUNT, {"b_key": key, "now": self._clock()}).scalar_one())

        return await self._store.run(fn)

    # -- both ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def guard(
        self,
        key: str,
        rate: RateLimit | None,
        holder: str | None = None,
        *,
        lease: float = 30.0,
        timeout: float | None = None,
    ) -> AsyncIterator[None]:
        """Apply a tool's whole :class:`RateLimit`: take a token, then hold a slot if limited."""
        if rate is None:
            yield
            return
        await self.acquire(key, rate, timeout=timeout)
        if rate.concurrency is None:
            yield
            return
        async with self.slot(key, rate.concurrency, holder, lease, timeout=timeout):
            yield


class _Renewer:
    """Renews a held slot's lease every third of it, from a timer (no task unless needed)."""

    def __init__(self, limiter: RateLimiter, handle: SlotHandle) -> None:
        self._limiter = limiter
        self._handle = handle
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(handle.lease / 3, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._task = self._loop.create_task(self._renew())

    async def _renew(self) -> None:
        try:
            if not await self._limiter.renew(self._handle):
                self._handle.lost = True
                log.warning(
                    "concurrency slot %s of %s expired while held", self._handle.key, self._handle.holder
                )
                return
        except Exception as exc:  # a failed renewal is retried at the next tick
            log.warning("cannot renew concurrency slot %s: %s", self._handle.key, exc)
        self._task = None
        self._timer = self._loop.call_later(self._handle.lease / 3, self._fire)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            self._task.cancel()


_BACKGROUND: set[asyncio.Task[Any]] = set()


def _background(coro: Awaitable[Any]) -> None:
    async def run() -> None:
        with contextlib.suppress(Exception):
            await coro

    task = asyncio.get_running_loop().create_task(run())
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


def _check_key(key: str) -> None:
    if not key or len(key) > 300:
        raise InvalidInputError(f"rate limit key must be 1 to 300 characters, got {len(key)}")


# -- statements ----------------------------------------------------------------

_K = t.rate_buckets.c
_S = t.tool_slots.c
_NOW = sa.bindparam("now", type_=sa.Float)
_BURST = sa.bindparam("burst", type_=sa.Float)
_RATE_P = sa.bindparam("rate", type_=sa.Float)


def _take_statement(insert: Callable[[sa.Table], Any]) -> Any:
    """Upsert taking one token; returns a row only when a token was available.

    The level is ``min(burst, tokens + elapsed * rate)`` with elapsed never negative, so a
    process whose clock is behind neither refills nor drains the bucket.
    """
    later = sa.case((_K.updated_at < _NOW, _NOW), else_=_K.updated_at)
    level = _K.tokens + (later - _K.updated_at) * _RATE_P
    capped = sa.case((level > _BURST, _BURST), else_=level)
    stmt = insert(t.rate_buckets).values(key=sa.bindparam("b_key"), tokens=_BURST - 1.0, updated_at=_NOW)
    return stmt.on_conflict_do_update(
        index_elements=["key"], set_={"tokens": capped - 1.0, "updated_at": later}, where=capped >= 1.0
    ).returning(_K.tokens)


_BUCKET = sa.select(_K.tokens, _K.updated_at).where(_K.key == sa.bindparam("b_key"))
_SLOT_PURGE = t.tool_slots.delete().where(
    _S.key == sa.bindparam("b_key"), sa.or_(_S.expires_at < _NOW, _S.holder == sa.bindparam("b_holder"))
)
_SLOT_TAKE = (
    t.tool_slots.insert()
    .from_select(
        ["key", "holder", "expires_at"],
        sa.select(
            sa.bindparam("b_key", type_=sa.String),
            sa.bindparam("b_holder", type_=sa.String),
            sa.bindparam("exp", type_=sa.Float),
        ).where(
            sa.select(sa.func.count())
            .select_from(t.tool_slots)
            .where(_S.key == sa.bindparam("b_key"))
            .scalar_subquery()
            < sa.bindparam("limit", type_=sa.Integer)
        ),
    )
    .returning(_S.holder)
)  # not rowcount: psycopg reports -1 for INSERT .. SELECT
_SLOT_FREE = t.tool_slots.delete().where(
    _S.key == sa.bindparam("b_key"), _S.holder == sa.bindparam("b_holder")
)
_SLOT_RENEW = (
    t.tool_slots.update()
    .where(_S.key == sa.bindparam("b_key"), _S.holder == sa.bindparam("b_holder"))
    .values(expires_at=sa.bindparam("exp"))
)
_SLOT_COUNT = (
    sa.select(sa.func.count())
    .select_from(t.tool_slots)
    .where(_S.key == sa.bindparam("b_key"), _S.expires_at >= _NOW)
)

__all__ = ["ConcurrencyLimited", "RateLimited", "RateLimiter", "SlotHandle", "run_retrying"]
