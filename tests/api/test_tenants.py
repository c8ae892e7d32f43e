"""Tenant isolation: another tenant's admin reads, approves, starts and lists, and finds nothing.

Every lookup of another tenant's object answers 404 (never 403), so existence does not leak.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from controltower.api import create_app

from .conftest import Api, make_services, publish, seed, spec_named


@pytest.fixture
async def api_any(store_url: str) -> AsyncIterator[Api]:
    """The API over SQLite and over PostgreSQL."""
    svc = await make_services(store_url)
    tokens = await seed(svc)
    transport = httpx.ASGITransport(app=create_app(svc))
    async with httpx.AsyncClient(transport=transport, base_url="http://tower.test") as client:
        yield Api(svc, client, tokens)
    await svc.engine.close()


async def _acme_world(api: Api) -> dict[str, Any]:
    """acme: a published workflow, a run waiting at a step approval, one at a tool approval."""
    await publish(api, "acme")
    start = {"workflow": "payout", "input": {"amount": 7}, "idempotency_key": "k-1"}
    first = (await api.call("POST", "/v1/runs", "acme", "operator", json=start)).json()["id"]
    second = (
        await api.call(
            "POST", "/v1/runs", "acme", "operator", json={"workflow": "payout", "input": {"amount": 8}}
        )
    ).json()["id"]
    for run_id in (first, second):
        await api.wait_status(run_id, "acme", {"waiting"})
    r = await api.call(
        "POST", f"/v1/runs/{second}/approvals/sign_off", "acme", "approver", json={"approved": True}
    )
    assert r.status_code == 200, r.text
    for _ in range(200):
        tools = (await api.call("GET", "/v1/approvals?kind=tool", "acme", "viewer")).json()["items"]
        if tools:
            break
        await asyncio.sleep(0.05)
    (tool,) = tools
    tokens = (await api.call("GET", "/v1/tokens", "acme", "admin")).json()["items"]
    return {
        "run": first,
        "run2": second,
        "step_approval": f"step:{first}:sign_off",
        "tool_approval": tool["id"],
        "token_id": tokens[0]["id"],
    }


async def test_another_tenant_finds_nothing(api_any: Api) -> None:
    api = api_any
    w = await _acme_world(api)
    run, apr, step = w["run"], w["tool_approval"], w["step_approval"]
    not_found = [
        ("GET", f"/v1/runs/{run}", None),
        ("GET", f"/v1/runs/{run}/events?max_seconds=1", None),
        ("POST", f"/v1/runs/{run}/cancel", {}),
        ("POST", f"/v1/runs/{run}/resume", None),
        ("POST", f"/v1/runs/{run}/signals", {"event": "go"}),
        ("POST", f"/v1/runs/{run}/approvals/sign_off", {"approved": True}),
        ("GET", f"/v1/approvals/{apr}", None),
        ("POST", f"/v1/approvals/{apr}/approve", {}),
        ("POST", f"/v1/approvals/{apr}/edit", {"args": {"amount": 1}}),
        ("POST", f"/v1/approvals/{apr}/reject", {"reason": "mine now"}),
        ("GET", f"/v1/approvals/{step}", None),
        ("POST", f"/v1/approvals/{step}/approve", {}),
        ("POST", f"/v1/approvals/{step}/reject", {"reason": "x"}),
        ("GET", "/v1/workflows/payout", None),
        ("GET", "/v1/workflows/payout/versions", None),
        ("GET", "/v1/workflows/payout/versions/1", None),
        ("GET", "/v1/workflows/payout/kpis", None),
        ("POST", "/v1/runs", {"workflow": "payout", "input": {"amount": 1}}),
        ("POST", "/v1/runs", {"workflow": "payout", "input": {"amount": 7}, "idempotency_key": "k-1"}),
        ("GET", "/v1/tools/payout.pay/versions", None),
        ("POST", "/v1/policies/explain", {"tool": "payout.pay", "workflow": "payout"}),
        ("DELETE", f"/v1/tokens/{w['token_id']}", None),
        ("POST", "/v1/users/admin-acme/disable", None),
    ]
    for method, url, body in not_found:
        r = await api.call(method, url, "globex", "admin", json=body)
        assert r.status_code == 404, (method, url, r.status_code, r.text)
        assert r.headers["content-type"] == "application/problem+json"

    lists = [
        "/v1/runs",
        "/v1/runs?workflow=payout",
        "/v1/approvals",
        "/v1/approvals?status=approved",
        "/v1/workflows",
        "/v1/tools",
        "/v1/audit",
        "/v1/budgets",
        "/v1/tokens",
        "/v1/users",
    ]
    acme_markers = [run, w["run2"], apr, "payout", "acme"]
    for url in lists:
        r = await api.call("GET", url, "globex", "admin")
        assert r.status_code == 200, (url, r.text)
        text = r.text
        assert not any(m in text for m in acme_markers), (url, text[:300])
    r = await api.call("GET", "/v1/audit/export", "globex", "admin")
    assert r.status_code == 200
    assert "acme" not in r.text

    # acme's objects are untouched and still there for acme
    r = await api.call("GET", f"/v1/runs/{run}", "acme", "viewer")
    assert (r.status_code, r.json()["status"]) == (200, "waiting")
    r = await api.call("GET", f"/v1/approvals/{apr}", "acme", "viewer")
    assert (r.status_code, r.json()["status"]) == (200, "pending")
    assert (await api.call("GET", "/v1/me", "acme", "admin")).status_code == 200
    audit = (await api.call("GET", "/v1/audit", "acme", "admin")).json()["items"]
    assert audit, "acme's own audit trail is visible to acme"


async def test_names_are_owned_and_runs_are_per_tenant(api_any: Api) -> None:
    api = api_any
    await publish(api, "acme")
    # globex cannot take over acme's workflow name, but publishes and runs its own
    r = await api.call("POST", "/v1/workflows", "globex", "operator", json={"spec": spec_named("payout")})
    assert (r.status_code, r.json()["code"]) == (409, "conflict")
    await publish(api, "globex", spec_named("gpayout"))
    body = {"workflow": "gpayout", "input": {"amount": 2}, "idempotency_key": "k-1"}
    r = await api.call("POST", "/v1/runs", "globex", "operator", json=body)
    assert r.status_code == 201, r.text
    g_run = r.json()["id"]
    run = await api.wait_status(g_run, "globex", {"waiting"})
    assert run["steps"][0]["status"] == "completed"  # its own tool resolved in its own registry
    assert (await api.call("GET", f"/v1/runs/{g_run}", "acme", "admin")).status_code == 404
    listed = (await api.call("GET", "/v1/runs", "acme", "admin")).json()["items"]
    assert listed == []
