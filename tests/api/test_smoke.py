"""The whole loop over real HTTP: publish, start, approve a step and a tool call, watch events."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from .conftest import Api, publish


async def test_publish_start_approve_and_finish(api: Api) -> None:
    await publish(api, "acme")
    r = await api.call(
        "POST", "/v1/runs", "acme", "operator", json={"workflow": "payout", "input": {"amount": 5}}
    )
    assert r.status_code == 201, r.text
    run_id = r.json()["id"]
    await api.wait_status(run_id, "acme", {"waiting"})
    inbox = (await api.call("GET", "/v1/approvals", "acme", "approver")).json()["items"]
    assert [(a["kind"], a["group"], a["prompt"]) for a in inbox] == [("step", "managers", "Pay this?")]
    r = await api.call("POST", f"/v1/approvals/{inbox[0]['id']}/approve", "acme", "approver", json={})
    assert r.status_code == 200, r.text
    # the irreversible payment now waits for the gateway's approval (group finance)
    deadline = 0
    while True:
        items = (await api.call("GET", "/v1/approvals", "acme", "approver")).json()["items"]
        if items:
            break
        deadline += 1
        assert deadline < 200, (await api.call("GET", f"/v1/runs/{run_id}", "acme", "viewer")).json()["error"]
        await asyncio.sleep(0.05)
    (tool,) = items
    assert tool["kind"] == "tool"
    assert tool["tool"] == "payout.pay"
    assert tool["args"] == {"amount": 5, "to": None}
    r = await api.call(
        "POST",
        f"/v1/approvals/{tool['id']}/edit",
        "acme",
        "approver",
        json={"args": {"amount": 4, "to": "x"}},
    )
    assert r.status_code == 200, r.text
    run = await api.wait_status(run_id, "acme", {"completed", "failed"})
    assert run["status"] == "completed", run
    assert run["output"] == {"paid": 4}
    assert [s["step_id"] for s in run["steps"]] == ["find", "sign_off", "pay"]


async def test_sse_stream_over_a_real_server(live: tuple[Api, httpx.AsyncClient]) -> None:
    api, client = live
    await publish(api, "acme")
    headers = api.auth("acme", "operator")
    r = await client.post("/v1/runs", json={"workflow": "payout", "input": {"amount": 1}}, headers=headers)
    run_id = r.json()["id"]
    events: list[tuple[str, Any]] = []
    async with client.stream("GET", f"/v1/runs/{run_id}/events", headers=headers) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        kind = None
        cancelled = False
        async for line in stream.aiter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((kind, json.loads(line.removeprefix("data: "))))
                if kind == "run" and events[-1][1]["status"] == "waiting" and not cancelled:
                    cancelled = True
                    r = await client.post(
                        f"/v1/runs/{run_id}/cancel", json={"reason": "test"}, headers=headers
                    )
                    assert r.status_code == 200, r.text
            if kind == "end" and line.startswith("data: "):
                break
    kinds = [k for k, _ in events]
    assert "step" in kinds
    assert kinds[-1] == "end"
    assert events[-1][1]["status"] == "cancelled"


async def _events(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    found = []
    async with client.stream("GET", url, headers=headers) as stream:
        assert stream.status_code == 200
        async for line in stream.aiter_lines():
            if line.startswith("data: "):
                found.append(json.loads(line.removeprefix("data: ")))
    return found


async def test_tenant_event_stream_shows_only_the_tenants_runs(live: tuple[Api, httpx.AsyncClient]) -> None:
    api, client = live
    await publish(api, "acme")
    headers = api.auth("acme", "operator")
    r = await client.post("/v1/runs", json={"workflow": "payout", "input": {"amount": 1}}, headers=headers)
    run_id = r.json()["id"]
    await api.wait_status(run_id, "acme", {"waiting"})
    mine = await _events(client, "/v1/events?since=0&max_seconds=0.5", api.auth("acme", "viewer"))
    assert run_id in {e["id"] for e in mine}
    assert {e["status"] for e in mine if e["id"] == run_id} <= {"running", "waiting"}
    theirs = await _events(client, "/v1/events?since=0&max_seconds=0.5", api.auth("globex", "admin"))
    assert theirs == []
