"""The dashboard over plain HTTP (no browser): sessions, CSRF, editing and rejecting approvals,
approval steps, live fragments and the packaged assets."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest
import sqlalchemy as sa

from controltower.spec.models import WorkflowSpec
from controltower.store import tables as t

from .conftest import PASSWORD, Tower, serve

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    found = CSRF.search(html)
    assert found, "no CSRF field on the page"
    return found.group(1)


@pytest.fixture
async def tower(store_url: str) -> AsyncIterator[Tower]:
    """Every test here runs on SQLite and on PostgreSQL."""
    async with serve(store_url) as running:
        yield running


@pytest.fixture
async def client(tower: Tower) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=tower.url, timeout=10) as c:
        yield c


async def sign_in(client: httpx.AsyncClient, tenant: str, username: str) -> str:
    page = await client.get("/ui/login")
    response = await client.post(
        "/ui/login",
        data={"csrf": csrf_of(page.text), "tenant": tenant, "username": username, "password": PASSWORD},
    )
    assert response.status_code == 303, response.text
    return response.headers["set-cookie"]


async def test_login_sets_a_strict_session_cookie_and_refuses_forged_or_wrong_logins(
    tower: Tower, client: httpx.AsyncClient
) -> None:
    await tower.auth.create_user("default", "fiona", PASSWORD, ["approver"], ["finance"])
    first = await client.get("/ui/runs")
    assert first.status_code == 303
    assert first.headers["location"].startswith("/ui/login?next=")

    await client.get("/ui/login")
    forged = await client.post(
        "/ui/login", data={"csrf": "nope", "tenant": "default", "username": "fiona", "password": PASSWORD}
    )
    assert forged.status_code == 400
    assert "tower_session" not in forged.headers.get("set-cookie", "")
    page = await client.get("/ui/login")  # each rendering of the form has a fresh token
    wrong = await client.post(
        "/ui/login",
        data={"csrf": csrf_of(page.text), "tenant": "default", "username": "fiona", "password": "wrong pass"},
    )
    assert wrong.status_code == 401
    assert "Wrong tenant, username or password." in wrong.text

    page = await client.get("/ui/login")
    ok = await client.post(
        "/ui/login",
        data={
            "csrf": csrf_of(page.text),
            "tenant": "default",
            "username": "fiona",
            "password": PASSWORD,
            "next": "//evil.example/steal",
        },
    )
    assert ok.status_code == 303
    assert ok.headers["location"] == "/ui/runs"
    cookie = ok.headers["set-cookie"].lower()
    assert "tower_session=" in cookie
    assert "httponly" in cookie
    assert "samesite=lax" in cookie
    runs = await client.get("/ui/runs")
    assert runs.status_code == 200
    assert "fiona" in runs.text

    # an HTMX poll after the session ended is sent to the login page, not given a broken fragment
    await client.post("/ui/logout", data={"csrf": csrf_of(runs.text)})
    poll = await client.get("/ui/runs/table", headers={"HX-Request": "true"})
    assert poll.headers.get("HX-Redirect") == "/ui/login"


async def test_edited_arguments_are_validated_again_and_run(tower: Tower, client: httpx.AsyncClient) -> None:
    await tower.auth.create_user("default", "fiona", PASSWORD, ["approver"], ["finance"])
    run_id = await tower.refund_run(4200)
    (pending,) = await tower.gateway.approvals.list()
    await sign_in(client, "default", "fiona")
    page = await client.get(f"/ui/approvals/{pending.id}")
    assert page.status_code == 200
    assert "Approve edited arguments" in page.text
    token = csrf_of(page.text)

    async def edit(args: str) -> httpx.Response:
        return await client.post(
            f"/ui/approvals/{pending.id}", data={"csrf": token, "action": "edit", "args": args}
        )

    bad_json = await edit('{"ticket": "T-1", "amount_cents": ')
    assert bad_json.status_code == 400
    assert "not valid JSON" in bad_json.text
    assert "amount_cents&#34;: " in bad_json.text  # what the user typed is kept in the textarea
    bad_schema = await edit('{"ticket": "T-1", "amount_cents": "lots"}')
    assert bad_schema.status_code == 400
    assert "schema" in bad_schema.text
    over_ceiling = await edit('{"ticket": "T-1", "amount_cents": 90000}')
    assert over_ceiling.status_code == 400
    assert "policy denies" in over_ceiling.text
    assert (await tower.gateway.approvals.get(pending.id)).status == "pending"

    done = await edit('{"ticket": "T-1", "amount_cents": 2100}')
    assert done.status_code == 303
    run = await tower.engine.wait(run_id, timeout=10)
    assert run.status == "completed"
    assert run.output["refunded_cents"] == 2100
    again = await edit('{"ticket": "T-1", "amount_cents": 2100}')
    assert again.status_code == 409
    assert "already approved" in again.text


async def test_a_rejection_needs_a_reason_and_fails_the_run(tower: Tower, client: httpx.AsyncClient) -> None:
    await tower.auth.create_user("default", "ada", PASSWORD, ["admin"])
    run_id = await tower.refund_run(4200)
    (pending,) = await tower.gateway.approvals.list()
    await sign_in(client, "default", "ada")
    token = csrf_of((await client.get("/ui/approvals")).text)
    silent = await client.post(f"/ui/approvals/{pending.id}", data={"csrf": token, "action": "reject"})
    assert silent.status_code == 400
    assert "needs a reason" in silent.text
    said = await client.post(
        f"/ui/approvals/{pending.id}", data={"csrf": token, "action": "reject", "reason": "duplicate ticket"}
    )
    assert said.status_code == 303
    run = await tower.engine.wait(run_id, timeout=10)
    assert run.status == "failed"
    assert "duplicate ticket" in run.error["message"]
    history = await client.get("/ui/approvals")
    assert "duplicate ticket" in history.text
    assert "rejected" in history.text


async def test_approval_steps_are_decided_on_the_run_page(tower: Tower, client: httpx.AsyncClient) -> None:
    await tower.auth.create_user("default", "fiona", PASSWORD, ["approver"], ["finance"])
    await tower.auth.create_user("default", "vic", PASSWORD, ["viewer"])
    spec = WorkflowSpec.model_validate(
        {
            "name": "signoff",
            "steps": [
                {"id": "ok", "kind": "approval", "prompt": "Ship the quarter close?", "group": "finance"}
            ],
            "kpis": [
                {
                    "name": "cycle_seconds",
                    "measure": "run.duration",
                    "aggregate": "p50",
                    "unit": "s",
                    "baseline": 3600,
                    "target": 60,
                    "direction": "down",
                    "minutes_saved_per_run": 25,
                }
            ],
        }
    )
    run_id = await tower.engine.start(spec, {})
    await tower.engine.wait(run_id, statuses=("waiting",), timeout=10)

    await sign_in(client, "default", "vic")
    inbox = await client.get("/ui/approvals")
    assert "Ship the quarter close?" in inbox.text
    assert "Ship the quarter close?" not in (await client.get("/ui/approvals?mine=1")).text
    page = await client.get(f"/ui/runs/{run_id}")
    assert "you can see this approval but not decide it" in page.text.lower()
    refused = await client.post(
        f"/ui/runs/{run_id}/approval-step",
        data={"csrf": csrf_of(page.text), "step_key": "ok", "action": "approve"},
    )
    assert refused.status_code == 403

    client.cookies.clear()
    await sign_in(client, "default", "fiona")
    assert "Ship the quarter close?" in (await client.get("/ui/approvals?mine=1")).text
    page = await client.get(f"/ui/runs/{run_id}")
    decided = await client.post(
        f"/ui/runs/{run_id}/approval-step",
        data={"csrf": csrf_of(page.text), "step_key": "ok", "action": "approve", "reason": "numbers tie out"},
    )
    assert decided.status_code == 303
    run = await tower.engine.wait(run_id, timeout=10)
    assert run.status == "completed"
    live = await client.get(f"/ui/runs/{run_id}/live")
    assert "hx-trigger" not in live.text  # a finished run stops polling
    assert "numbers tie out" in live.text

    # an llm agent's model calls show on the run with their tokens and cost
    def record(conn: sa.Connection) -> None:
        row = {"run_id": run_id, "step_key": "ok", "call_index": 0, "workflow": "signoff", "agent": "clerk"}
        row |= {"model": "house-model", "request": "[]", "response": "{}", "input_tokens": 1200}
        row |= {"output_tokens": 300, "cost_micros": 4500, "started_at": 1.0, "finished_at": 2.5}
        conn.execute(t.model_calls.insert().values(tenant="default", **row))

    await tower.engine.store.run(record)
    page = await client.get(f"/ui/runs/{run_id}")
    assert "house-model" in page.text
    assert "1200 / 300" in page.text
    assert "0.0045" in page.text

    # the workflow's page: KPIs against baseline and target, ROI charts drawn on the server
    workflow = await client.get("/ui/workflows/signoff")
    assert workflow.status_code == 200
    assert workflow.text.count('<svg viewBox="0 0') == 6  # five ROI charts and one per KPI
    assert "cycle_seconds" in workflow.text
    assert "meets target" in workflow.text  # lower is better: a second beats the target of a minute
    assert 'class="baseline"' in workflow.text
    assert 'class="target"' in workflow.text
    assert "0.42 h" in workflow.text  # one completed run x 25 minutes saved
    strange = await client.get("/ui/workflows/signoff?days=lots")
    assert strange.status_code == 200


async def test_the_runs_list_filters_and_pages(tower: Tower, client: httpx.AsyncClient) -> None:
    await tower.auth.create_user("default", "vic", PASSWORD, ["viewer"])
    spec = WorkflowSpec.model_validate({"name": "queued", "steps": [{"id": "ok", "kind": "approval"}]})
    ids = [await tower.engine.start(spec, {"n": n}, execute=False) for n in range(52)]
    await sign_in(client, "default", "vic")
    first = await client.get("/ui/runs", params={"workflow": "queued", "status": "pending"})
    shown = re.findall(r'href="/ui/runs/(run_\w+)"', first.text)
    newest_first = sorted(ids, reverse=True)  # ids sort by creation time (to the millisecond)
    assert shown == newest_first[:50]
    older = re.search(r'href="(/ui/runs\?[^"]*before=[^"]+)"', first.text)
    assert older is not None
    second = await client.get(older.group(1).replace("&amp;", "&"))
    assert re.findall(r'href="/ui/runs/(run_\w+)"', second.text) == newest_first[50:]
    none = await client.get("/ui/runs", params={"status": "failed"})
    assert "No runs match these filters." in none.text
    ignored = await client.get("/ui/runs", params={"status": "bogus"})  # an unknown status is no filter
    assert ignored.status_code == 200
