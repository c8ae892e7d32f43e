"""What the endpoints return: pagination, specs and versions, KPIs, tools, policies, audit, budgets."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from controltower.gateway.audit import verify_jsonl

from .conftest import SPEC, Api, publish


async def _pages(api: Api, url: str, limit: int) -> list[list[Any]]:
    pages: list[list[Any]] = []
    cursor = None
    while True:
        sep = "&" if "?" in url else "?"
        full = f"{url}{sep}limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        body = (await api.call("GET", full, "acme", "admin")).json()
        pages.append(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages


async def test_specs_versions_and_pagination(api: Api) -> None:
    first = await publish(api, "acme")
    assert first["version"] == 1
    again = await api.call("POST", "/v1/workflows", "acme", "operator", json={"spec": SPEC})
    assert (again.status_code, again.json()["version"]) == (200, 1)  # same content, same version
    changed = {**SPEC, "description": "v2"}
    r = await api.call("POST", "/v1/workflows", "acme", "operator", json={"spec": changed})
    assert (r.status_code, r.json()["version"]) == (201, 2)
    versions = await _pages(api, "/v1/workflows/payout/versions", 1)
    assert [[v["version"] for v in page] for page in versions] == [[2], [1]]
    detail = (await api.call("GET", "/v1/workflows/payout/versions/1", "acme", "viewer")).json()
    assert detail["spec"]["description"] == SPEC["description"]
    yaml = "name: other\nsteps:\n  - {id: a, kind: approval}\n"
    r = await api.call("POST", "/v1/workflows", "acme", "operator", json={"yaml": yaml})
    assert r.status_code == 201, r.text
    names = await _pages(api, "/v1/workflows", 1)
    assert [[w["name"] for w in page] for page in names] == [["other"], ["payout"]]

    for i in range(5):
        body = {"workflow": "payout", "input": {"amount": i}}
        assert (await api.call("POST", "/v1/runs", "acme", "operator", json=body)).status_code == 201
    pages = await _pages(api, "/v1/runs", 2)
    assert [len(p) for p in pages] == [2, 2, 1]
    ids = [r["id"] for p in pages for r in p]
    assert ids == sorted(ids, reverse=True)
    assert len(set(ids)) == 5
    for run_id in ids:
        await api.wait_status(run_id, "acme", {"waiting"})
    inbox = await _pages(api, "/v1/approvals", 2)
    assert [len(p) for p in inbox] == [2, 2, 1]
    assert {a["run_id"] for p in inbox for a in p} == set(ids)
    filtered = (await api.call("GET", "/v1/runs?status=completed", "acme", "viewer")).json()["items"]
    assert filtered == []


async def test_signal_cancel_resume_and_kpis(api: Api) -> None:
    spec = {
        "name": "waiter",
        "steps": [{"id": "hold", "kind": "wait", "event": "go"}],
        "output": {"got": "${{ steps.hold.output.data }}"},
        "kpis": [{"name": "done", "measure": "1", "aggregate": "count", "minutes_saved_per_run": 3}],
    }
    await publish(api, "acme", spec)
    run_id = (await api.call("POST", "/v1/runs", "acme", "operator", json={"workflow": "waiter"})).json()[
        "id"
    ]
    await api.wait_status(run_id, "acme", {"waiting"})
    r = await api.call(
        "POST", f"/v1/runs/{run_id}/signals", "acme", "operator", json={"event": "go", "data": 42}
    )
    assert r.status_code == 202, r.text
    run = await api.wait_status(run_id, "acme", {"completed", "failed"})
    assert (run["status"], run["output"]) == ("completed", {"got": 42})
    kpis = (await api.call("GET", "/v1/workflows/waiter/kpis", "acme", "viewer")).json()
    assert kpis["runs_considered"] == 1
    assert kpis["kpis"][0]["value"] == 1
    assert kpis["kpis"][0]["minutes_saved"] == 3

    other = (await api.call("POST", "/v1/runs", "acme", "operator", json={"workflow": "waiter"})).json()["id"]
    await api.wait_status(other, "acme", {"waiting"})
    r = await api.call(
        "POST", f"/v1/runs/{other}/cancel", "acme", "operator", json={"reason": "no longer needed"}
    )
    assert r.json()["status"] == "cancelled"
    r = await api.call("POST", f"/v1/runs/{other}/resume", "acme", "operator")
    assert r.status_code == 409


async def test_tools_policies_audit_and_budgets(api: Api, tmp_path: Path) -> None:
    await publish(api, "acme")
    tools = (await api.call("GET", "/v1/tools", "acme", "viewer")).json()["items"]
    assert {t["name"] for t in tools} == {"payout.lookup", "payout.pay"}
    pay = next(t for t in tools if t["name"] == "payout.pay")
    assert (pay["side_effect"], pay["risk"]) == ("irreversible", "high")
    assert "source_ref" not in pay  # server paths and bindings stay on the server
    policies = (await api.call("GET", "/v1/policies", "acme", "viewer")).json()
    assert {p["id"] for p in policies["policies"]} == {"reads", "payouts"}
    explained = await api.call(
        "POST", "/v1/policies/explain", "acme", "viewer", json={"tool": "payout.pay", "workflow": "payout"}
    )
    body = explained.json()
    assert (body["effect"], body["approval_group"], body["policy_ids"]) == (
        "require_approval",
        "finance",
        ["payouts"],
    )
    assert "decision: require_approval" in body["explanation"]

    run_id = (
        await api.call(
            "POST", "/v1/runs", "acme", "operator", json={"workflow": "payout", "input": {"amount": 3}}
        )
    ).json()["id"]
    await api.wait_status(run_id, "acme", {"waiting"})
    await api.call("POST", f"/v1/approvals/step:{run_id}:sign_off/approve", "acme", "approver", json={})
    for _ in range(200):
        items = (await api.call("GET", "/v1/approvals?kind=tool", "acme", "viewer")).json()["items"]
        if items:
            break
        await asyncio.sleep(0.05)
    r = await api.call(
        "POST", f"/v1/approvals/{items[0]['id']}/reject", "acme", "approver", json={"reason": "no"}
    )
    assert r.json()["status"] == "rejected"
    await api.wait_status(run_id, "acme", {"failed"})
    history = (await api.call("GET", "/v1/approvals?status=rejected", "acme", "viewer")).json()["items"]
    assert [a["reason"] for a in history] == ["no"]

    records = (await api.call("GET", f"/v1/audit?run_id={run_id}", "acme", "viewer")).json()["items"]
    assert {"tool_call", "approval"} <= {r["kind"] for r in records}
    verified = (await api.call("GET", "/v1/audit/verify", "acme", "viewer")).json()
    assert verified["ok"] is True
    assert verified["checked"] >= len(records)
    export = await api.call("GET", "/v1/audit/export", "acme", "admin")
    assert export.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(x) for x in export.text.splitlines()]
    assert [x["seq"] for x in lines] == sorted(x["seq"] for x in lines)
    assert len(lines) >= len(records)
    exported = tmp_path / "audit.jsonl"  # the export verifies record by record with the library's checker
    exported.write_text(export.text)
    result = verify_jsonl(exported, contiguous=False)
    assert result.ok, result.message

    await api.services.gateway.budgets.set_cap("acme", "tenant:acme", "micros", 5_000_000)  # type: ignore[union-attr]
    budgets = (await api.call("GET", "/v1/budgets", "acme", "viewer")).json()["items"]
    assert [(b["scope"], b["cap"]) for b in budgets] == [("tenant:acme", 5_000_000)]
