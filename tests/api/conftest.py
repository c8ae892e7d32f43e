"""An API server per test over a fresh SQLite file: two tenants, a user and token per role.

``api.client`` talks to the app in-process (httpx ASGITransport); ``live_server`` runs the
same app in a real uvicorn server on a loopback port.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from controltower.api import Services, create_app
from controltower.auth import AuthService
from controltower.engine import EmbeddedEngine
from controltower.gateway.engine_gate import GovernedToolGate
from controltower.gateway.pipeline import open_gateway

ROLES = ("admin", "operator", "approver", "viewer")
TENANTS = ("acme", "globex")
PASSWORD = "correct horse battery"

POLICY = """
@id("reads")
permit (principal, action in Action::"read", resource);

@id("payouts")
@approval("finance")
permit (principal, action in Action::"irreversible", resource);
"""

SPEC: dict[str, Any] = {
    "name": "payout",
    "description": "Look up an account, get a manager's sign-off, pay.",
    "governance": {"autonomy": "approve_writes"},
    "input_schema": {
        "type": "object",
        "required": ["amount"],
        "properties": {"amount": {"type": "integer"}, "to": {"type": "string"}},
    },
    "tools": {
        "lookup": {"impl": "api.impls:lookup"},
        "pay": {"impl": "api.impls:pay", "side_effect": "irreversible", "risk": "high"},
    },
    "steps": [
        {"id": "find", "kind": "tool", "tool": "lookup", "input": {"account": "A-1"}},
        {"id": "sign_off", "kind": "approval", "prompt": "Pay this?", "group": "managers"},
        {
            "id": "pay",
            "kind": "tool",
            "tool": "pay",
            "input": {"amount": "${{ input.amount }}", "to": "${{ input.to }}"},
        },
    ],
    "output": {"paid": "${{ steps.pay.output.paid }}"},
}


def spec_named(name: str) -> dict[str, Any]:
    return {**SPEC, "name": name}


@dataclass
class Api:
    services: Services
    client: httpx.AsyncClient
    tokens: dict[tuple[str, str], str] = field(default_factory=dict)

    def auth(self, tenant: str, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[(tenant, role)]}"}

    async def call(self, method: str, url: str, tenant: str, role: str, **kw: Any) -> httpx.Response:
        headers = {**self.auth(tenant, role), **kw.pop("headers", {})}
        return await self.client.request(method, url, headers=headers, **kw)

    async def wait_status(self, run_id: str, tenant: str, statuses: set[str], timeout: float = 10) -> Any:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            r = await self.call("GET", f"/v1/runs/{run_id}", tenant, "viewer")
            assert r.status_code == 200, r.text
            if r.json()["status"] in statuses:
                return r.json()
            assert asyncio.get_running_loop().time() < deadline, r.json()
            await asyncio.sleep(0.05)


async def make_services(url: str, *, max_body: int = 256 * 1024) -> Services:
    engine = await EmbeddedEngine.open(url, poll_interval=0.05)
    gateway = await open_gateway(engine.store, policy_texts={"payouts.cedar": POLICY})
    engine.tool_gate = GovernedToolGate(gateway)
    return Services(
        store=engine.store,
        engine=engine,
        gateway=gateway,
        # a cheap password hash keeps fixtures fast; the hash format records the cost anyway
        auth=AuthService(engine.store, scrypt_n=2**8),
        max_body_bytes=max_body,
        stream_poll_seconds=0.05,
    )


async def seed(svc: Services) -> dict[tuple[str, str], str]:
    tokens: dict[tuple[str, str], str] = {}
    for tenant in TENANTS:
        for role in ROLES:
            groups = ("managers", "finance") if role == "approver" else ()
            principal = await svc.auth.create_user(tenant, f"{role}-{tenant}", PASSWORD, [role], groups)
            tokens[(tenant, role)] = await svc.auth.issue_token(principal, ["*"], 3600)
    return tokens


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    svc = await make_services(f"sqlite:///{tmp_path / 'tower.db'}")
    tokens = await seed(svc)
    app = create_app(svc)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tower.test") as client:
        yield Api(svc, client, tokens)
    await svc.engine.close()


@contextlib.asynccontextmanager
async def serve(svc: Services) -> AsyncIterator[str]:
    """The app in a real uvicorn server on a free loopback port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(svc), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
        assert not task.done(), "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.fixture
async def live(api: Api) -> AsyncIterator[tuple[Api, httpx.AsyncClient]]:
    async with serve(api.services) as base, httpx.AsyncClient(base_url=base, timeout=10) as client:
        yield api, client


async def publish(api: Api, tenant: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    r = await api.call("POST", "/v1/workflows", tenant, "operator", json={"spec": spec or SPEC})
    assert r.status_code in (200, 201), r.text
    body: dict[str, Any] = r.json()
    return body
