"""TriggerRunner: cron and queue triggers of published workflows, started and stopped with the server."""

from __future__ import annotations

import math
import time

import pytest
from tests.triggers.helpers import Services, runs_of, spec
from tests.triggers.test_queues import produce, until

from controltower.engine import EmbeddedEngine
from controltower.triggers import TriggerRunner
from controltower.triggers.runner import describe


async def test_the_runner_fires_cron_and_consumes_queues_of_published_workflows(
    engine: EmbeddedEngine, queue_stream: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    backend, stream = queue_stream
    monkeypatch.setenv("TOWER_NOTIFY_WEBHOOK_URL", "http://127.0.0.1:9/hook")
    await engine.publish(spec("every-minute", triggers=[{"kind": "cron", "schedule": "* * * * *"}]))
    queue = {"kind": "queue", "backend": backend, "stream": stream, "claim_after": 1}
    await engine.publish(spec("from-queue", triggers=[queue]))
    # the clock is pinned mid-minute: a real one could cross a minute boundary under load and
    # (correctly) fire a second tick, which this test is not about
    pinned = math.floor(time.time() / 60) * 60 + 30.0
    runner = TriggerRunner(Services(engine, engine.store), refresh=0.2, clock=lambda: pinned)
    async with runner:
        # a schedule seen for the first time fires its latest tick if it is within the grace period
        await until(lambda: _count(engine, "every-minute", 1))
        await until(lambda: _consumers(runner, 1))
        await produce(backend, stream, [b'{"order": 7}'])
        await until(lambda: _count(engine, "from-queue", 1))
        assert runner.notifier is not None
        assert runner.notifier.on_run_failed in engine.failure_hooks
    assert runner.consumers == []
    runs = await runs_of(engine.store, "from-queue")
    assert runs[0].input == {"order": 7}
    assert len(await runs_of(engine.store, "every-minute")) == 1
    await engine.drain()


async def _count(engine: EmbeddedEngine, workflow: str, n: int) -> bool:
    return len(await runs_of(engine.store, workflow)) == n


async def _consumers(runner: TriggerRunner, n: int) -> bool:
    return len(runner.consumers) == n


def test_triggers_are_described_in_one_line() -> None:
    wf = spec(
        "x",
        triggers=[
            {"kind": "webhook", "secret_env": "X_SECRET"},
            {"kind": "cron", "schedule": "0 8 * * 1-5", "timezone": "Europe/Paris"},
            {"kind": "queue", "backend": "nats", "stream": "ORDERS", "subject": "orders.new"},
        ],
    )
    assert [describe("x", t) for t in wf.triggers] == [
        "webhook POST /v1/webhooks/x (secret $X_SECRET)",
        "cron '0 8 * * 1-5' (Europe/Paris, missed: run_once)",
        "queue nats ORDERS subject orders.new (group tower-x)",
    ]
