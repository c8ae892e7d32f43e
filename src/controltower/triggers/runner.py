"""`TriggerRunner`: the cron scheduler and the queue consumers of every published workflow.

``tower serve`` and ``tower triggers run`` start one per process; any number of processes may
share a store (each tick and each message still starts exactly one run). Published workflows
are re-read every ``refresh`` seconds: a new queue trigger gets a consumer, a removed one stops.
When notification channels are configured (``TOWER_NOTIFY_*``, ``TOWER_SMTP_*``), the runner
also plugs them into the gateway's approval events, the engine's approval steps and run failures,
and delivers through the store's durable outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from controltower.notify import Notifier
from controltower.spec.models import QueueTrigger
from controltower.triggers._common import TriggerServices, latest_published
from controltower.triggers.cron import CronEntry, CronScheduler
from controltower.triggers.queues import QueueConsumer, consumer_for

log = logging.getLogger("controltower.triggers")

_QUEUE_LIBS = {"redis": "redis", "nats": "nats"}


@dataclass
class _Running:
    consumer: QueueConsumer
    stop: asyncio.Event
    task: asyncio.Task[None]


@dataclass
class TriggerRunner:
    services: TriggerServices
    refresh: float = 30.0
    grace: float = 60.0
    notify: bool = True
    notifier: Notifier | None = None
    clock: Callable[[], float] = time.time  # the cron scheduler's wall clock (tests pin it)
    _stop: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list, init=False)
    _consumers: dict[str, _Running] = field(default_factory=dict, init=False)
    _warned: set[str] = field(default_factory=set, init=False)

    async def start(self) -> None:
        """Start cron and queue consumption in the background; returns at once."""
        engine = self.services.engine
        if self.notify and self.notifier is None:
            base_url: str | None = getattr(self.services, "base_url", None)
            self.notifier = Notifier.from_env(base_url=base_url, store=engine.store)
        if self.notifier is not None:
            self.notifier.attach(engine=engine, gateway=getattr(self.services, "gateway", None))
            self.notifier.start()  # the outbox sender: also what an earlier process left pending
            log.info("notifications on: %s", ", ".join(c.name for c in self.notifier.channels))
        self._stop = asyncio.Event()
        cron = CronScheduler(engine, grace=self.grace, max_sleep=self.refresh, clock=self.clock)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(cron.run(self.cron_entries, self._stop), name="tower-cron"),
            loop.create_task(self._supervise_queues(), name="tower-queues"),
        ]

    async def stop(self) -> None:
        self._stop.set()
        for running in self._consumers.values():
            running.stop.set()
        tasks = [*self._tasks, *(r.task for r in self._consumers.values())]
        _done, pending = await asyncio.wait(tasks, timeout=10) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._consumers.clear()
        if self.notifier is not None:
            await self.notifier.aclose()

    async def __aenter__(self) -> TriggerRunner:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def consumers(self) -> list[QueueConsumer]:
        return [r.consumer for r in self._consumers.values()]

    async def cron_entries(self) -> list[CronEntry]:
        try:
            published = await latest_published(self.services.store)
        except Exception as exc:  # the store is away: try again at the next refresh
            log.warning("triggers: cannot read published workflows: %s", exc)
            return []
        return [entry for p in published for entry in CronEntry.of(p)]

    async def sync_queues(self) -> None:
        """Start a consumer for every queue trigger of a published workflow; stop the others."""
        wanted: dict[str, tuple[str, str, QueueTrigger]] = {}
        for p in await latest_published(self.services.store):
            for trig in p.spec.triggers:
                if isinstance(trig, QueueTrigger):
                    key = f"{p.spec.name}|{trig.model_dump_json()}"
                    wanted[key] = (p.spec.name, p.tenant, trig)
        for key in set(self._consumers) - set(wanted):
            running = self._consumers.pop(key)
            running.stop.set()
            await asyncio.gather(running.task, return_exceptions=True)
        for key, (workflow, tenant, trig) in wanted.items():
            if key in self._consumers or not self._library(trig.backend):
                continue
            consumer = consumer_for(self.services.engine, workflow, trig, tenant=tenant)
            stop = asyncio.Event()
            task = asyncio.get_running_loop().create_task(
                consumer.serve(stop), name=f"tower-queue-{workflow}"
            )
            self._consumers[key] = _Running(consumer, stop, task)
            log.info("triggers: consuming %s %s for %s", trig.backend, trig.stream, workflow)

    async def _supervise_queues(self) -> None:
        while not self._stop.is_set():
            try:
                await self.sync_queues()
            except Exception as exc:
                log.warning("triggers: cannot refresh queue consumers: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.refresh)

    def _library(self, backend: str) -> bool:
        if importlib.util.find_spec(_QUEUE_LIBS[backend]) is not None:
            return True
        if backend not in self._warned:
            self._warned.add(backend)
            log.error("triggers: %s queue triggers need: pip install 'controltower[queues]'", backend)
        return False


def describe(workflow: str, trigger: Any) -> str:
    """One line for listings."""
    kind = trigger.kind
    if kind == "cron":
        return f"cron {trigger.schedule!r} ({trigger.timezone}, missed: {trigger.missed})"
    if kind == "webhook":
        secret = f"${trigger.secret_env}" if trigger.secret_env else "no secret_env: deliveries are refused"
        return f"webhook POST /v1/webhooks/{trigger.path or workflow} (secret {secret})"
    if kind == "queue":
        where = trigger.stream
        if trigger.backend == "nats":
            where += f" subject {trigger.subject or trigger.stream}"
        return f"queue {trigger.backend} {where} (group {trigger.group or 'tower-' + workflow})"
    return str(kind)
