"""Queue triggers: one run per message from Redis Streams or NATS JetStream.

The order is always: receive -> start the run (committed to the store) -> acknowledge. The run's
idempotency key is derived from the message id (``redis:<stream>:<entry id>``,
``nats:<stream>:<stream sequence>``), so a message delivered again after a consumer died between
the start and the ack finds its run and is acknowledged without starting a second one; a message
never acknowledged is never lost (Redis: ``XAUTOCLAIM`` after ``claim_after`` idle; JetStream:
redelivery after ``ack_wait`` = ``claim_after``).

A message whose payload the workflow refuses (not JSON, or not matching its input schema) can
never succeed: it is acknowledged and parked (Redis: appended to ``<stream>:dead``; JetStream:
``term``), and logged.

Needs the ``queues`` extra (``redis``, ``nats-py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from controltower.engine import EmbeddedEngine
from controltower.spec.errors import InvalidInputError, TowerError
from controltower.spec.ids import new_id
from controltower.spec.models import QueueTrigger

log = logging.getLogger("controltower.triggers.queues")

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


@dataclass(frozen=True, slots=True)
class QueueMessage:
    backend: str
    stream: str
    id: str
    payload: Any

    @property
    def idempotency_key(self) -> str:
        return f"{self.backend}:{self.stream}:{self.id}"


class PoisonMessage(Exception):
    """The message can never start a run (bad payload); it is parked, not retried."""


# Called after a message's run is durably started and before the ack (a seam for tests and metrics).
StartedHook = Callable[[QueueMessage, str], Awaitable[None]]


class QueueConsumer(ABC):
    """Consumes one queue trigger of one workflow until ``stop`` is set."""

    backend: str = ""

    def __init__(
        self,
        engine: EmbeddedEngine,
        workflow: str,
        trigger: QueueTrigger,
        *,
        tenant: str = "default",
        consumer: str | None = None,
        on_started: StartedHook | None = None,
        retry_delay: float = 1.0,
    ) -> None:
        self.engine = engine
        self.workflow = workflow
        self.trigger = trigger
        self.tenant = tenant
        self.group = trigger.group or f"tower-{workflow}"
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{new_id('c')[-6:]}"
        self.on_started = on_started
        self.retry_delay = retry_delay
        self.started = 0

    @abstractmethod
    async def run(self, stop: asyncio.Event) -> None: ...

    async def serve(self, stop: asyncio.Event) -> None:
        """``run`` that survives a broken connection: reconnect after ``retry_delay``."""
        while not stop.is_set():
            try:
                await self.run(stop)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "%s consumer of %s on %s: %s: %s; reconnecting",
                    self.backend,
                    self.workflow,
                    self.trigger.stream,
                    type(exc).__name__,
                    exc,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.retry_delay)

    async def start_run(self, msg: QueueMessage) -> str:
        """Start (or find) the message's run; raises PoisonMessage when it can never start."""
        try:
            run_id = await self.engine.start(
                self.workflow, msg.payload, idempotency_key=msg.idempotency_key, tenant=self.tenant
            )
        except InvalidInputError as exc:
            raise PoisonMessage(exc.message) from None
        self.started += 1
        if self.on_started is not None:
            await self.on_started(msg, run_id)
        return run_id


def decode_payload(data: bytes | str) -> Any:
    if isinstance(data, bytes):
        try:
            data = data.decode()
        except UnicodeDecodeError:
            raise PoisonMessage("the message is not UTF-8 text") from None
    if not data.strip():
        return {}
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise PoisonMessage(f"the message is not JSON: {exc}") from None


# -- Redis Streams ---------------------------------------------------------------------------


class RedisStreamConsumer(QueueConsumer):
    """A member of a consumer group: ``XREADGROUP`` new entries, ``XAUTOCLAIM`` abandoned ones.

    An entry with a ``payload`` field is that JSON value; otherwise its fields are the input.
    """

    backend = "redis"

    async def run(self, stop: asyncio.Event) -> None:
        import redis.asyncio as aioredis
        from redis.exceptions import ResponseError

        url = self.trigger.url or os.environ.get("TOWER_REDIS_URL") or DEFAULT_REDIS_URL
        client = aioredis.Redis.from_url(url, decode_responses=True)
        stream = self.trigger.stream
        try:
            try:
                await client.xgroup_create(stream, self.group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            idle_ms = max(int(self.trigger.claim_after * 1000), 1)
            next_claim = 0.0
            while not stop.is_set():
                if time.monotonic() >= next_claim:
                    await self._claim_abandoned(client, idle_ms)
                    next_claim = time.monotonic() + max(self.trigger.claim_after / 2, 0.1)
                block = int(min(1.0, max(self.trigger.claim_after / 2, 0.1)) * 1000)
                answer: Any = await client.xreadgroup(
                    self.group, self.consumer, {stream: ">"}, count=self.trigger.batch, block=block
                )
                for _name, entries in answer or []:
                    for entry_id, fields in entries:
                        await self._handle(client, entry_id, fields)
        finally:
            await client.aclose()

    async def _claim_abandoned(self, client: Any, idle_ms: int) -> None:
        """Take over entries delivered but not acknowledged for ``claim_after`` (a dead consumer's)."""
        start = "0-0"
        while True:
            answer = await client.xautoclaim(
                self.trigger.stream, self.group, self.consumer, idle_ms, start, count=self.trigger.batch
            )
            start, entries = answer[0], answer[1]
            for entry_id, fields in entries:
                if fields is not None:
                    log.info("redis %s: reclaimed %s", self.trigger.stream, entry_id)
                    await self._handle(client, entry_id, fields)
            if start == "0-0" or not entries:
                return

    async def _handle(self, client: Any, entry_id: str, fields: dict[str, str]) -> None:
        stream = self.trigger.stream
        try:
            payload = decode_payload(fields["payload"]) if "payload" in fields else dict(fields)
            msg = QueueMessage("redis", stream, entry_id, payload)
            run_id = await self.start_run(msg)
        except PoisonMessage as exc:
            log.error("redis %s: entry %s parked in %s:dead: %s", stream, entry_id, stream, exc)
            async with client.pipeline(transaction=True) as pipe:
                pipe.xadd(f"{stream}:dead", {**fields, "tower_id": entry_id, "tower_error": str(exc)[:2000]})
                pipe.xack(stream, self.group, entry_id)
                await pipe.execute()
            return
        except TowerError as exc:  # the store is down or similar: leave it pending, it is reclaimed
            log.warning("redis %s: entry %s not started (%s); will retry", stream, entry_id, exc)
            return
        await client.xack(stream, self.group, entry_id)
        log.debug("redis %s: entry %s -> run %s", stream, entry_id, run_id)


# -- NATS JetStream --------------------------------------------------------------------------


class NatsJetStreamConsumer(QueueConsumer):
    """A durable pull consumer; the message body is the JSON input.

    The stream is created (with ``subject``, default the stream name) when it does not exist.
    """

    backend = "nats"

    async def run(self, stop: asyncio.Event) -> None:
        import nats
        from nats.errors import TimeoutError as NatsTimeout
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        from nats.js.errors import NotFoundError as StreamNotFound

        url = self.trigger.url or os.environ.get("TOWER_NATS_URL") or DEFAULT_NATS_URL
        nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=3)
        try:
            js = nc.jetstream()
            stream = self.trigger.stream
            subject = self.trigger.subject or stream
            try:
                await js.stream_info(stream)
            except StreamNotFound:
                await js.add_stream(name=stream, subjects=[subject])
            config = ConsumerConfig(
                durable_name=self.group,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=self.trigger.claim_after,
                filter_subject=subject,
            )
            sub = await js.pull_subscribe(subject, durable=self.group, stream=stream, config=config)
            wait = min(1.0, max(self.trigger.claim_after / 2, 0.1))
            while not stop.is_set():
                try:
                    messages = await sub.fetch(self.trigger.batch, timeout=wait)
                except (NatsTimeout, TimeoutError):  # nothing arrived within the wait
                    continue
                for message in messages:
                    await self._handle(message)
        finally:
            # close, not drain: unacknowledged messages are redelivered anyway
            with contextlib.suppress(Exception):
                await nc.close()

    async def _handle(self, message: Any) -> None:
        stream = self.trigger.stream
        seq = str(message.metadata.sequence.stream)
        try:
            msg = QueueMessage("nats", stream, seq, decode_payload(message.data))
            run_id = await self.start_run(msg)
        except PoisonMessage as exc:
            log.error("nats %s: message %s terminated: %s", stream, seq, exc)
            await message.term()
            return
        except TowerError as exc:
            log.warning("nats %s: message %s not started (%s); will be redelivered", stream, seq, exc)
            await message.nak(delay=self.retry_delay)
            return
        await message.ack_sync()
        log.debug("nats %s: message %s -> run %s", stream, seq, run_id)


def consumer_for(
    engine: EmbeddedEngine,
    workflow: str,
    trigger: QueueTrigger,
    *,
    tenant: str = "default",
    consumer: str | None = None,
    on_started: StartedHook | None = None,
) -> QueueConsumer:
    cls: type[QueueConsumer] = RedisStreamConsumer if trigger.backend == "redis" else NatsJetStreamConsumer
    return cls(engine, workflow, trigger, tenant=tenant, consumer=consumer, on_started=on_started)
