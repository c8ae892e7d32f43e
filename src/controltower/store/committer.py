"""Group commit: one database thread turns many concurrent requests into few transactions.

Every store call becomes a job on a queue. The thread drains whatever is queued,
runs it all in one transaction and commits once, so a thousand runs finishing a
step at the same moment cost one fsync, not a thousand. Consecutive jobs of the
same kind (e.g. step inserts) are merged into one executemany.

If a batch fails, it is rolled back and its jobs are re-run one per transaction,
so one bad request fails alone and the others still commit.

Relaxed jobs (``submit(..., durable=False)``) need their commit to be visible to every
connection at once but not yet on disk: the store commits a batch without waiting for the
disk only when EVERY job in it is relaxed (SQLite: ``synchronous=NORMAL`` for that commit,
set outside the transaction; PostgreSQL: ``SET LOCAL synchronous_commit TO OFF``). A batch
with one durable job commits durably. The log is sequential on both, so the next durable
commit makes the earlier relaxed ones durable too; an OS crash before it loses them together
with everything after them, never a later commit without an earlier one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import queue
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

# Fault injection for crash tests: TOWER_FAULT_KILL_IN_COMMIT=N makes the store thread
# SIGKILL its own process after N batches, inside the transaction, before COMMIT.
_KILL_AFTER = int(os.environ.get("TOWER_FAULT_KILL_IN_COMMIT", "0") or 0)

_NUDGE = object()  # queued with an urgent job: wakes the store thread

BatchFn = Callable[[sa.Connection, list[Any]], list[Any]]
# (connection outside any transaction, relaxed?) -> None: prepare the next commit's durability
SyncFn = Callable[[sa.Connection, bool], None]
# (connection inside the transaction) -> None: make this transaction's commit relaxed
RelaxFn = Callable[[sa.Connection], None]


@dataclass(slots=True)
class _Job:
    fn: BatchFn
    key: Hashable | None
    arg: Any
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    durable: bool = True
    on_commit: Callable[[Any], None] | None = None  # called on the store thread, after COMMIT


class GroupCommitter:
    """Owns one connection and one thread; all SQL for a store goes through it."""

    def __init__(
        self,
        engine: sa.Engine,
        *,
        max_batch: int = 2000,
        name: str = "tower-store",
        set_sync: SyncFn | None = None,
        relax_in: RelaxFn | None = None,
    ) -> None:
        self._engine = engine
        self._max_batch = max_batch
        self._set_sync = set_sync
        self._relax_in = relax_in
        self._relaxed = 0
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()  # _Job, _NUDGE or None (stop)
        self._urgent: collections.deque[_Job] = collections.deque()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._closed = False
        self._batches = 0
        self._thread.start()

    @property
    def batches(self) -> int:
        """How many transactions have been committed (for tests and benchmarks)."""
        return self._batches

    @property
    def relaxed_batches(self) -> int:
        """How many of them were committed without waiting for the disk (all jobs relaxed)."""
        return self._relaxed

    @property
    def can_relax(self) -> bool:
        """False when every commit is already as durable as it gets (nothing to relax)."""
        return self._set_sync is not None or self._relax_in is not None

    def submit(
        self,
        fn: BatchFn,
        arg: Any = None,
        key: Hashable | None = None,
        *,
        durable: bool = True,
        on_commit: Callable[[Any], None] | None = None,
        urgent: bool = False,
    ) -> asyncio.Future[Any]:
        """Queue ``fn(conn, [arg, ...])``; jobs with the same non-None ``key`` may be merged.

        ``durable=False``: the job's commit must be visible at once but may reach the disk with
        the next durable commit (see the module docstring); it is committed that way only in a
        batch of relaxed jobs, else durably.

        ``on_commit(result)`` runs on the store thread as soon as the job's transaction has
        committed, before the future is resolved on its loop (which happens only when the loop
        gets control): for a caller that polls the outcome without yielding to the loop.

        ``urgent``: the job goes before everything queued that is not running yet, in a
        transaction of its own (for work that does not depend on what is queued before it,
        e.g. a new budget allotment while many records wait to be written).
        """
        if self._closed:
            raise RuntimeError("store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        job = _Job(fn, key, arg, loop, future, durable, on_commit)
        if urgent:
            self._urgent.append(job)
            self._queue.put(_NUDGE)  # wakes the thread if it waits for work
        else:
            self._queue.put(job)
        return future

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=30)

    # -- the database thread ------------------------------------------------

    def _main(self) -> None:
        with self._engine.connect() as conn:
            while True:
                if self._urgent:
                    self._run(conn, self._take_urgent())
                first = self._queue.get()
                if first is None:
                    return
                if first is _NUDGE:
                    continue
                batch = [first]
                stop = False
                while len(batch) < self._max_batch:
                    try:
                        job = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if job is None:
                        stop = True
                        break
                    if job is not _NUDGE:
                        batch.append(job)
                if self._urgent:  # queued meanwhile: before the batch, in a transaction of their own
                    self._run(conn, self._take_urgent())
                self._run(conn, batch)
                if stop:
                    return

    def _take_urgent(self) -> list[_Job]:
        jobs = []
        while self._urgent:
            jobs.append(self._urgent.popleft())
        return jobs

    def _begin(self, conn: sa.Connection, relaxed: bool) -> sa.RootTransaction:
        """Start a transaction whose commit waits for the disk unless ``relaxed``."""
        relaxed = relaxed and self.can_relax
        if self._set_sync is not None:  # outside the transaction (SQLite: a per-connection pragma)
            self._set_sync(conn, relaxed)
        tx = conn.begin()
        if relaxed and self._relax_in is not None:
            try:
                self._relax_in(conn)
            except BaseException:
                tx.rollback()
                raise
        return tx

    def _run(self, conn: sa.Connection, batch: list[_Job]) -> None:
        groups = _group(batch)
        outcomes: list[tuple[_Job, bool, Any]] = []
        relaxed = not any(job.durable for job in batch)
        try:
            with self._begin(conn, relaxed):
                for group in groups:
                    results = group[0].fn(conn, [job.arg for job in group])
                    outcomes.extend((job, True, res) for job, res in zip(group, results, strict=True))
                self._batches += 1
                self._relaxed += relaxed and self.can_relax
                if _KILL_AFTER and self._batches >= _KILL_AFTER:
                    import signal

                    os.kill(os.getpid(), signal.SIGKILL)
        except Exception as exc:
            if len(batch) == 1:
                outcomes = [(batch[0], False, exc)]
            else:
                outcomes = [self._run_alone(conn, job) for job in batch]
        self._deliver(outcomes)

    def _run_alone(self, conn: sa.Connection, job: _Job) -> tuple[_Job, bool, Any]:
        try:
            with self._begin(conn, not job.durable):
                (result,) = job.fn(conn, [job.arg])
            self._batches += 1
            self._relaxed += not job.durable and self.can_relax
            return job, True, result
        except BaseException as exc:  # delivered to the caller, never lost in this thread
            return job, False, exc

    @staticmethod
    def _deliver(outcomes: list[tuple[_Job, bool, Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, bool, Any]]] = {}
        for item in outcomes:
            job, ok, value = item
            if ok and job.on_commit is not None and not isinstance(value, BaseException):
                with contextlib.suppress(Exception):  # a hook must not stop the delivery
                    job.on_commit(value)
            by_loop.setdefault(job.loop, []).append(item)
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
                loop.call_soon_threadsafe(_settle, items)


def _settle(items: list[tuple[_Job, bool, Any]]) -> None:
    for job, ok, value in items:
        if job.future.done():
            continue
        if ok and isinstance(value, BaseException):  # a batch function failing one job alone
            job.future.set_exception(value)
        elif ok:
            job.future.set_result(value)
        else:
            job.future.set_exception(value)


def _group(batch: list[_Job]) -> list[list[_Job]]:
    groups: list[list[_Job]] = []
    for job in batch:
        if groups and job.key is not None and groups[-1][0].key == job.key:
            groups[-1].append(job)
        else:
            groups.append([job])
    return groups
