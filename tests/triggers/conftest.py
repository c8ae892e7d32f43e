"""Fixtures for trigger tests: services on both stores, the webhook router on a loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator

import pytest
import uvicorn
from fastapi import FastAPI
from tests.triggers.helpers import Services, free_port, service_missing

from controltower.engine import EmbeddedEngine
from controltower.triggers.webhooks import build_router

REDIS_URL = os.environ.get("TOWER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
NATS_URL = os.environ.get("TOWER_TEST_NATS_URL", "nats://127.0.0.1:4222")


@pytest.fixture
async def services(engine: EmbeddedEngine) -> Services:
    return Services(engine=engine, store=engine.store)


@pytest.fixture
async def webhook_url(services: Services) -> AsyncIterator[str]:
    """The webhook router served by uvicorn on a loopback port."""
    app = FastAPI()
    app.state.services = services
    app.include_router(build_router())
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(200):
        if server.started:
            break
        await asyncio.sleep(0.02)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    with contextlib.suppress(asyncio.CancelledError):
        await task


@pytest.fixture(params=["redis", "nats"])
async def queue_stream(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, str]]:
    """``(backend, stream)``: a fresh stream on the local Redis or NATS JetStream, removed afterwards.

    A JetStream stream's subject is its name.
    """
    backend: str = request.param
    if backend == "redis":
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            await asyncio.wait_for(client.ping(), 3)
        except Exception as exc:
            await client.aclose()
            service_missing(f"Redis at {REDIS_URL} is not reachable: {exc}")
        name = f"tower-test-{uuid.uuid4().hex[:10]}"
        yield backend, name
        await client.delete(name, f"{name}:dead")
        await client.aclose()
        return
    import nats

    try:
        nc = await nats.connect(NATS_URL, connect_timeout=3, max_reconnect_attempts=0, allow_reconnect=False)
        js = nc.jetstream()
        await js.account_info()
    except Exception as exc:
        service_missing(f"NATS JetStream at {NATS_URL} is not reachable: {exc}")
    name = f"TOWER_TEST_{uuid.uuid4().hex[:10]}"
    yield backend, name
    with contextlib.suppress(Exception):
        await js.delete_stream(name)
    await nc.close()
