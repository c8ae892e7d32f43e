"""Cron triggers: exactly one run per tick, across restarts and processes sharing a store.

A tick is identified by (tenant, workflow, schedule + time zone, tick time). The run it starts has
the idempotency key ``cron:<trigger>:<tick UTC ISO>``, and the store's unique index on run
idempotency keys makes that start atomic: any number of schedulers (in one process or many
sharing PostgreSQL, before or after a restart) fire a tick and only one run exists. The
``cron_ticks`` table is each schedule's cursor, so a scheduler that was down knows which ticks
it missed and applies the spec's ``missed`` policy (``skip`` / ``run_once`` / ``run_all`` with
``max_catch_up``). A tick counts as missed when it is older than ``grace`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from croniter import croniter

from controltower.engine import EmbeddedEngine
from controltower.spec.errors import TowerError
from controltower.spec.models import CronTrigger
from controltower.store import tables as t
from controltower.triggers._common import Published

log = logging.getLogger("controltower.triggers.cron")

# a backwards scan never walks further than this many ticks past the catch-up cap
_SCAN_SLACK = 1000


@dataclass(frozen=True, slots=True)
class CronEntry:
    """One cron trigger of one published workflow."""

    workflow: str
    tenant: str
    trigger: CronTrigger

    @property
    def key(self) -> str:
        """Stable id of the schedule (a changed schedule or zone is a new cursor)."""
        text = f"{self.trigger.schedule}|{self.trigger.timezone}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def of(cls, published: Published) -> list[CronEntry]:
        return [
            cls(published.spec.name, published.tenant, trig)
            for trig in published.spec.triggers
            if isinstance(trig, CronTrigger)
        ]


@dataclass(frozen=True, slots=True)
class Fired:
    """A tick that was due: the run it started (None when the policy skipped it or it failed)."""

    workflow: str
    tick_at: float
    run_id: str | None
    missed: bool


def ticks_between(trigger: CronTrigger, after: float, until: float, limit: int) -> list[float]:
    """Tick times in ``(after, until]``, newest first, at most ``limit``."""
    zone = ZoneInfo(trigger.timezone)
    # croniter's get_prev is strict: start half a second past the whole second so a tick at
    # exactly ``until`` counts, and nothing after it does
    start = datetime.fromtimestamp(math.floor(until) + 0.5, zone)
    it = croniter(trigger.schedule, start)
    out: list[float] = []
    while len(out) < limit:
        tick = float(it.get_prev(float))
        if tick <= after:
            break
        out.append(tick)
    return out


def next_tick(trigger: CronTrigger, after: float) -> float:
    it = croniter(trigger.schedule, datetime.fromtimestamp(after, ZoneInfo(trigger.timezone)))
    return float(it.get_next(float))


def tick_key(entry: CronEntry, tick_at: float) -> str:
    return f"cron:{entry.key}:{datetime.fromtimestamp(tick_at, UTC).isoformat()}"


class CronScheduler:
    """Fires due ticks of the given entries; ``run`` loops until stopped."""

    def __init__(
        self,
        engine: EmbeddedEngine,
        *,
        grace: float = 60.0,
        clock: Callable[[], float] = time.time,
        max_sleep: float = 30.0,
    ) -> None:
        self.engine = engine
        self.store = engine.store
        self.grace = grace
        self.clock = clock
        self.max_sleep = max_sleep

    async def fire_due(self, entries: Sequence[CronEntry], now: float | None = None) -> list[Fired]:
        """One pass: start a run for every due tick of every entry (idempotently)."""
        current = self.clock() if now is None else now
        fired: list[Fired] = []
        for entry in entries:
            try:
                fired.extend(await self._fire_entry(entry, current))
            except Exception:  # one broken schedule must not stop the others
                log.exception("cron: could not fire %s (%s)", entry.workflow, entry.trigger.schedule)
        return fired

    async def run(self, entries: Callable[[], Awaitable[Sequence[CronEntry]]], stop: asyncio.Event) -> None:
        """Fire due ticks, sleep until the next one (or ``max_sleep``, to see new workflows), repeat."""
        while not stop.is_set():
            current = await entries()
            await self.fire_due(current)
            now = self.clock()
            upcoming = [next_tick(e.trigger, now) for e in current]
            delay = min([self.max_sleep, *(u - now for u in upcoming)])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(delay, 0.05))

    async def _fire_entry(self, entry: CronEntry, now: float) -> list[Fired]:
        trig = entry.trigger
        cursor = await self._cursor(entry)
        if cursor is None:  # a schedule seen for the first time: nothing before it was missed
            cursor = now - self.grace
            first = ticks_between(trig, float("-inf"), cursor, 1)
            cursor = first[0] if first else cursor
            await self._record(entry, cursor, None, now)
        due = ticks_between(trig, cursor, now, trig.max_catch_up + _SCAN_SLACK)
        on_time = [x for x in due if x >= now - self.grace]
        missed = [x for x in due if x < now - self.grace]
        if trig.missed == "skip":
            catch_up: list[float] = []
        elif trig.missed == "run_once":
            catch_up = missed[:1]
        else:
            catch_up = missed[: trig.max_catch_up]
        if missed and len(catch_up) < len(missed):
            log.warning(
                "cron: %s missed %d tick(s) of %r; policy %s runs %d",
                entry.workflow,
                len(missed),
                trig.schedule,
                trig.missed,
                len(catch_up),
            )
        out: list[Fired] = []
        for tick in sorted([*catch_up, *on_time]):
            run_id = await self._start(entry, tick)
            await self._record(entry, tick, run_id, now)
            out.append(Fired(entry.workflow, tick, run_id, tick < now - self.grace))
        if due and max(due) not in {f.tick_at for f in out}:  # move the cursor past skipped ticks
            await self._record(entry, max(due), None, now)
        return out

    async def _start(self, entry: CronEntry, tick: float) -> str | None:
        try:
            return await self.engine.start(
                entry.workflow,
                dict(entry.trigger.input),
                idempotency_key=tick_key(entry, tick),
                tenant=entry.tenant,
            )
        except TowerError as exc:  # e.g. the trigger's input no longer fits the workflow's schema
            log.error("cron: %s tick %s did not start: %s", entry.workflow, _iso(tick), exc)
            return None

    async def _cursor(self, entry: CronEntry) -> float | None:
        def fn(conn: sa.Connection) -> float | None:
            c = t.cron_ticks
            query = sa.select(sa.func.max(c.c.tick_at)).where(
                c.c.tenant == entry.tenant, c.c.workflow == entry.workflow, c.c.trigger == entry.key
            )
            value = conn.execute(query).scalar()
            return None if value is None else float(value)

        return await self.store.run(fn)

    async def _record(self, entry: CronEntry, tick: float, run_id: str | None, now: float) -> None:
        row = {
            "tenant": entry.tenant,
            "workflow": entry.workflow,
            "trigger": entry.key,
            "tick_at": tick,
            "run_id": run_id,
            "created_at": now,
        }

        def fn(conn: sa.Connection) -> None:
            conn.execute(self.store.insert(t.cron_ticks).values(**row).on_conflict_do_nothing())

        await self.store.run(fn)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()
