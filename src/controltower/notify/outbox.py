"""The notification outbox: deliveries that survive a restart.

``enqueue`` writes one ``notifications`` row per channel (a second enqueue of the same event
key is a no-op); a sender loop claims the due rows, delivers them, and marks each ``sent``, or
``pending`` again with exponential backoff, or ``failed`` after the last attempt (attempts and
the last error are kept). A row claimed by a sender that died becomes due again after
``claim_for`` seconds, so delivery is at least once. Rows name a channel by its public name
(``webhook:<host>``, ``smtp:<host>:<port>``): URLs and passwords stay in the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from controltower.notify.channels import Channel, DeliveryError
from controltower.notify.messages import Notification
from controltower.spec.errors import InvalidInputError
from controltower.spec.ids import new_id
from controltower.store import SqlStore
from controltower.store import tables as t

log = logging.getLogger("controltower.notify")

MAX_KEY = 300


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: str
    key: str
    channel: str
    tenant: str
    event: str
    subject_id: str
    status: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    created_at: float
    sent_at: float | None
    message: Notification


def _row(row: sa.Row[Any]) -> OutboxRow:
    m = row._mapping
    return OutboxRow(
        id=m["id"],
        key=m["key"],
        channel=m["channel"],
        tenant=m["tenant"],
        event=m["event"],
        subject_id=m["subject_id"],
        status=m["status"],
        attempts=int(m["attempts"]),
        next_attempt_at=float(m["next_attempt_at"]),
        last_error=m["last_error"],
        created_at=float(m["created_at"]),
        sent_at=m["sent_at"],
        message=Notification.from_dict(json.loads(m["message"])),
    )


def _key(notification: Notification) -> str:
    key = notification.dedupe_key
    if len(key) <= MAX_KEY:
        return key
    return f"{notification.event}:sha256:{hashlib.sha256(key.encode()).hexdigest()}"


class Outbox:
    """Durable delivery of notifications to ``channels`` through the ``notifications`` table."""

    def __init__(
        self,
        store: SqlStore,
        channels: Sequence[Channel],
        *,
        attempts: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 300.0,
        poll_interval: float = 2.0,
        claim_for: float = 120.0,
        batch: int = 100,
    ) -> None:
        self.store = store
        self.channels = {c.name: c for c in channels}
        if len(self.channels) < len(channels):  # rows name their channel: names must be unique
            raise InvalidInputError(
                "two notification channels have the same name", hint="use one webhook per host"
            )
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.poll_interval = poll_interval
        self.claim_for = claim_for
        self.batch = batch
        self.delivered: list[tuple[str, str, str]] = []  # (channel, event, subject id), this process
        self.failed: list[tuple[str, str, str]] = []
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- writing -------------------------------------------------------------------------------

    def rows_for(self, notification: Notification, now: float) -> list[dict[str, Any]]:
        message = json.dumps(notification.to_dict(), separators=(",", ":"))
        return [
            {
                "id": new_id("ntf"),
                "key": _key(notification),
                "channel": name,
                "tenant": notification.tenant,
                "event": notification.event,
                "subject_id": notification.subject_id[:200],
                "message": message,
                "status": "pending",
                "attempts": 0,
                "next_attempt_at": now,
                "last_error": None,
                "created_at": now,
                "updated_at": now,
                "sent_at": None,
            }
            for name in self.channels
        ]

    def enqueue_in(self, conn: sa.Connection, notification: Notification, now: float) -> int:
        """Add the rows inside the caller's transaction; returns how many were new."""
        added = 0
        for row in self.rows_for(notification, now):
            result = conn.execute(self.store.insert(t.notifications).values(**row).on_conflict_do_nothing())
            added += max(result.rowcount or 0, 0)
        return added

    async def enqueue(self, notification: Notification) -> int:
        """Store the notification for every channel and wake the sender; returns how many rows are new."""
        now = time.time()
        added: int = await self.store.run(lambda conn: self.enqueue_in(conn, notification, now))
        if added:
            self._wake.set()
        return added

    # -- reading -------------------------------------------------------------------------------

    async def rows(self, *, status: str | None = None, subject_id: str | None = None) -> list[OutboxRow]:
        def fn(conn: sa.Connection) -> list[OutboxRow]:
            n = t.notifications
            query = sa.select(n).order_by(n.c.created_at, n.c.id)
            if status is not None:
                query = query.where(n.c.status == status)
            if subject_id is not None:
                query = query.where(n.c.subject_id == subject_id)
            return [_row(r) for r in conn.execute(query)]

        return await self.store.run(fn)

    async def pending(self) -> int:
        def fn(conn: sa.Connection) -> int:
            n = t.notifications
            query = sa.select(sa.func.count()).where(
                n.c.status == "pending", n.c.channel.in_(list(self.channels))
            )
            return int(conn.execute(query).scalar() or 0)

        return await self.store.run(fn)

    # -- sending -------------------------------------------------------------------------------

    async def claim(self, now: float) -> list[OutboxRow]:
        """Take the due rows of our channels (oldest first) for ``claim_for`` seconds."""
        names = list(self.channels)

        def fn(conn: sa.Connection) -> list[OutboxRow]:
            n = t.notifications
            due = conn.execute(
                sa.select(n)
                .where(n.c.status == "pending", n.c.next_attempt_at <= now, n.c.channel.in_(names))
                .order_by(n.c.created_at, n.c.id)
                .limit(self.batch)
            ).all()
            taken: list[OutboxRow] = []
            for row in due:
                claimed = conn.execute(
                    sa.update(n)
                    .where(
                        n.c.id == row.id,
                        n.c.status == "pending",
                        n.c.next_attempt_at == row.next_attempt_at,
                    )
                    .values(next_attempt_at=now + self.claim_for, updated_at=now)
                )
                if claimed.rowcount == 1:
                    taken.append(_row(row))
            return taken

        return await self.store.run(fn) if names else []

    async def deliver_due(self) -> int:
        """One pass: deliver every due row; channels in parallel, each channel in order."""
        rows = await self.claim(time.time())
        by_channel: dict[str, list[OutboxRow]] = {}
        for row in rows:
            by_channel.setdefault(row.channel, []).append(row)
        await asyncio.gather(*(self._deliver_all(name, items) for name, items in by_channel.items()))
        return len(rows)

    async def _deliver_all(self, name: str, rows: list[OutboxRow]) -> None:
        for row in rows:
            await self._deliver(self.channels[name], row)

    async def _deliver(self, channel: Channel, row: OutboxRow) -> None:
        attempt = row.attempts + 1
        error: str | None = None
        retryable = True
        try:
            await channel.deliver(row.message)
        except DeliveryError as exc:
            error, retryable = str(exc), exc.retryable
        except Exception as exc:  # a bug in a channel: record it, never break the loop
            log.exception("notification %s via %s: unexpected error", row.event, channel.name)
            error, retryable = f"{channel.name}: {type(exc).__name__}", False
        now = time.time()
        values: dict[str, Any] = {"attempts": attempt, "updated_at": now, "last_error": error}
        if error is None:
            values.update(status="sent", sent_at=now)
            self.delivered.append((channel.name, row.event, row.subject_id))
        elif attempt >= self.attempts or not retryable:
            values["status"] = "failed"
            self.failed.append((channel.name, row.event, row.subject_id))
        else:
            delay = min(self.backoff * 2 ** (attempt - 1), self.max_backoff)
            values["next_attempt_at"] = now + delay * (0.8 + 0.4 * random.random())
        if error is not None:
            last = values.get("status") == "failed"
            log.log(
                logging.ERROR if last else logging.WARNING,
                "notification %s %s via %s failed (attempt %d/%d): %s",
                row.event,
                row.subject_id,
                channel.name,
                attempt,
                self.attempts,
                error,
            )

        def fn(conn: sa.Connection) -> None:
            n = t.notifications
            conn.execute(sa.update(n).where(n.c.id == row.id, n.c.status == "pending").values(**values))

        await self.store.run(fn)

    async def next_due(self) -> float | None:
        names = list(self.channels)

        def fn(conn: sa.Connection) -> float | None:
            n = t.notifications
            query = sa.select(sa.func.min(n.c.next_attempt_at)).where(
                n.c.status == "pending", n.c.channel.in_(names)
            )
            value = conn.execute(query).scalar()
            return None if value is None else float(value)

        return await self.store.run(fn)

    async def serve(self) -> None:
        """The sender loop: deliver due rows; sleep until woken, the next due row, or a poll."""
        while not self._stop.is_set():
            self._wake.clear()
            wait = self.poll_interval
            try:
                if await self.deliver_due():
                    continue
                due = await self.next_due()
                if due is not None:
                    wait = max(0.0, min(wait, due - time.time()))
            except Exception as exc:  # the store is away: try again at the next poll
                log.warning("notification outbox: %s: %s", type(exc).__name__, exc)
            stop = asyncio.ensure_future(self._stop.wait())
            wake = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({stop, wake}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for fut in (stop, wake):
                    fut.cancel()
                    with contextlib.suppress(BaseException):
                        await fut

    def start(self) -> None:
        """Start the sender loop in the background (once); pending rows of earlier runs go out too."""
        if self._task is None or self._task.done():
            self._stop = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self.serve(), name="tower-notify-outbox")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until no row of our channels is pending (or ``timeout``); starts the sender."""
        self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while await self.pending():
            if deadline is not None and time.monotonic() >= deadline:
                return
            self._wake.set()
            await asyncio.sleep(0.02)

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the sender; a delivery in flight gets ``timeout`` seconds, undelivered rows stay."""
        self._stop.set()
        task, self._task = self._task, None
        if task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), timeout)
        if not task.done():
            task.cancel()
        with contextlib.suppress(BaseException):
            await task
