"""Queue triggers on the real Redis and NATS JetStream: ack after start, no lost or doubled message."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from tests.triggers.conftest import NATS_URL, REDIS_URL
from tests.triggers.helpers import runs_of, spec

from controltower.engine import EmbeddedEngine
from controltower.spec.models import QueueTrigger
from controltower.store import TERMINAL, SqlStore, open_store
from controltower.triggers.queues import QueueMessage, consumer_for

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}


class Crash(Exception):
    """Stands for a process dying after the run started and before the ack."""


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.1)


async def redis_pending(stream: str, group: str) -> int:
    import redis.asyncio as aioredis

    async with aioredis.Redis.from_url(REDIS_URL) as client:
        info: dict[str, Any] = await client.xpending(stream, group)
        return int(info["pending"])


async def produce(backend: str, stream: str, bodies: list[bytes]) -> None:
    if backend == "redis":
        import redis.asyncio as aioredis

        async with aioredis.Redis.from_url(REDIS_URL) as client:
            for body in bodies:
                await client.xadd(stream, {"payload": body})
        return
    import nats

    nc = await nats.connect(NATS_URL)
    js = nc.jetstream()
    await js.add_stream(name=stream, subjects=[stream])
    for body in bodies:
        await js.publish(stream, body)
    await nc.close()


async def queue_drained(backend: str, stream: str, group: str) -> bool:
    if backend == "redis":
        return await redis_pending(stream, group) == 0
    import nats

    nc = await nats.connect(NATS_URL)
    try:
        info = await nc.jetstream().consumer_info(stream, group)
        return info.num_ack_pending == 0 and info.num_pending == 0
    finally:
        await nc.close()


def bodies(count: int) -> list[bytes]:
    return [json.dumps({"n": i}).encode() for i in range(count)]


async def assert_one_run_per_message(store: SqlStore, count: int) -> None:
    runs = await runs_of(store, "queued")
    assert sorted(r.input["n"] for r in runs) == list(range(count))
    assert len({r.idempotency_key for r in runs}) == count


async def test_a_consumer_dying_before_the_ack_is_redelivered_without_a_second_run(
    engine: EmbeddedEngine, queue_stream: tuple[str, str]
) -> None:
    backend, stream = queue_stream
    await engine.publish(spec("queued", input_schema=SCHEMA))
    await produce(backend, stream, [*bodies(6), b"not json", b'{"n": "six"}'])
    trigger = QueueTrigger(backend=backend, stream=stream, claim_after=0.5, batch=4)  # type: ignore[arg-type]
    seen: list[tuple[str, str]] = []

    async def crash_on_second(msg: QueueMessage, run_id: str) -> None:
        seen.append((msg.id, run_id))
        if len(seen) == 2:
            raise Crash

    first = consumer_for(engine, "queued", trigger, consumer="a", on_started=crash_on_second)
    with pytest.raises(Crash):
        await first.run(asyncio.Event())
    assert len(await runs_of(engine.store, "queued")) == 2

    stop = asyncio.Event()
    second = consumer_for(engine, "queued", trigger, consumer="b", on_started=crash_on_second)
    task = asyncio.create_task(second.serve(stop))
    try:
        await until(lambda: queue_drained(backend, stream, "tower-queued"))
    finally:
        stop.set()
        await task
    await assert_one_run_per_message(engine.store, 6)
    redelivered = [run for mid, run in seen[2:] if mid == seen[1][0]]
    assert redelivered == [seen[1][1]]  # the crashed message found its first run
    if backend == "redis":
        import redis.asyncio as aioredis

        async with aioredis.Redis.from_url(REDIS_URL, decode_responses=True) as client:
            dead = await client.xrange(f"{stream}:dead")
        assert sorted(fields["payload"] for _, fields in dead) == ["not json", '{"n": "six"}']
    await engine.drain()


class Proc:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.triggers.queue_worker", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def stop(self) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.terminate()
        out, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, out, err


@pytest.mark.slow
async def test_a_killed_consumer_process_loses_and_doubles_nothing(
    sqlite_url: str, queue_stream: tuple[str, str]
) -> None:
    backend, stream = queue_stream
    count = 12
    await produce(backend, stream, bodies(count))
    crashed = Proc(backend, sqlite_url, stream, "--consumer", "a", "--crash-after", "4")
    code, out, err = await asyncio.to_thread(lambda: (crashed.proc.wait(timeout=60), *crashed.stop()[1:]))
    assert code == 17, err
    assert out.count("started ") == 4
    store = await open_store(sqlite_url)
    try:
        assert len(await runs_of(store, "queued")) == 4
        survivor = Proc(backend, sqlite_url, stream, "--consumer", "b")
        try:

            async def all_done() -> bool:
                runs = await runs_of(store, "queued")
                return len(runs) == count and all(r.status in TERMINAL for r in runs)

            await until(all_done, timeout=60)
            await until(lambda: queue_drained(backend, stream, "tower-queued"))
        finally:
            code, out, err = await asyncio.to_thread(survivor.stop)
        assert code == 0, err
        await assert_one_run_per_message(store, count)
        assert {r.status for r in await runs_of(store, "queued")} == {"completed"}
    finally:
        await store.close()
