"""Errors are RFC 9457 problems with stable codes; bad input is 4xx, never 500."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx

from .conftest import PASSWORD, Api, publish

PROBLEM = "application/problem+json"


def problem(r: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body: dict[str, object] = r.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"] == f"urn:controltower:problem:{code}"
    assert body["title"]
    assert body["detail"]
    return body


async def test_bad_missing_expired_and_revoked_tokens(api: Api) -> None:
    problem(await api.client.get("/v1/runs"), 401, "unauthenticated")
    r = await api.client.get("/v1/runs", headers={"Authorization": "Bearer nope"})
    assert problem(r, 401, "unauthenticated")["detail"] == "invalid API token"
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = await api.client.get("/v1/runs", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    problem(r, 401, "unauthenticated")
    r = await api.client.get("/v1/runs", headers={"Authorization": "Bearer " + "x" * 5000})
    problem(r, 401, "unauthenticated")
    # a token that is right but for one character
    good = api.tokens[("acme", "viewer")]
    r = await api.client.get(
        "/v1/runs", headers={"Authorization": f"Bearer {good[:-1]}{'A' if good[-1] != 'A' else 'B'}"}
    )
    problem(r, 401, "unauthenticated")

    principal = await api.services.auth.user_principal("acme", "viewer-acme")
    short = await api.services.auth.issue_token(principal, ["*"], 0.2)
    assert (await api.client.get("/v1/runs", headers={"Authorization": f"Bearer {short}"})).status_code == 200
    await asyncio.sleep(0.3)
    r = await api.client.get("/v1/runs", headers={"Authorization": f"Bearer {short}"})
    assert "expired" in str(problem(r, 401, "unauthenticated")["detail"])

    token = api.tokens[("acme", "operator")]
    token_id = token.split(".", 1)[0]
    r = await api.call("DELETE", f"/v1/tokens/{token_id}", "acme", "operator")
    assert r.status_code == 204
    r = await api.call("GET", "/v1/runs", "acme", "operator")
    assert "revoked" in str(problem(r, 401, "unauthenticated")["detail"])


async def test_sessions_log_in_and_out(api: Api) -> None:
    r = await api.client.post(
        "/v1/auth/login", json={"tenant": "acme", "username": "viewer-acme", "password": "wrong password"}
    )
    problem(r, 401, "unauthenticated")
    r = await api.client.post(
        "/v1/auth/login", json={"tenant": "globex", "username": "viewer-acme", "password": PASSWORD}
    )
    problem(r, 401, "unauthenticated")
    r = await api.client.post(
        "/v1/auth/login", json={"tenant": "acme", "username": "viewer-acme", "password": PASSWORD}
    )
    assert r.status_code == 200, r.text
    cookie = r.cookies["tower_session"]
    assert "httponly" in r.headers["set-cookie"].lower()
    api.client.cookies.clear()

    def with_cookie(value: str) -> dict[str, str]:
        return {"Cookie": f"tower_session={value}"}

    me = await api.client.get("/v1/me", headers=with_cookie(cookie))
    assert me.json()["subject"] == "viewer-acme"
    assert me.json()["tenant"] == "acme"
    await api.client.post("/v1/auth/logout", headers=with_cookie(cookie))
    api.client.cookies.clear()
    problem(await api.client.get("/v1/me", headers=with_cookie(cookie)), 401, "unauthenticated")
    problem(await api.client.get("/v1/me", headers=with_cookie("forged")), 401, "unauthenticated")


async def test_bad_input_is_a_4xx_problem(api: Api) -> None:
    headers = {**api.auth("acme", "admin"), "content-type": "application/json"}
    r = await api.client.post("/v1/runs", content=b'{"workflow": "payout", ', headers=headers)
    problem(r, 400, "malformed_json")
    r = await api.client.post("/v1/runs", json={"workflow": 5}, headers=headers)
    body = problem(r, 422, "validation_error")
    assert body["errors"]
    r = await api.client.post("/v1/runs", json=[1, 2], headers=headers)
    problem(r, 422, "validation_error")
    problem(await api.client.get("/v1/runs?limit=0", headers=headers), 422, "validation_error")
    problem(await api.client.get("/v1/runs?status=bogus", headers=headers), 422, "validation_error")
    problem(await api.client.get("/v1/runs?cursor=%%%", headers=headers), 422, "invalid_input")
    problem(await api.client.get("/v1/runs?cursor=bm90IGpzb24", headers=headers), 422, "invalid_input")
    problem(await api.client.get("/v1/approvals?cursor=WzFd", headers=headers), 422, "invalid_input")
    problem(await api.client.get("/v1/nowhere", headers=headers), 404, "not_found")
    problem(await api.client.delete("/v1/runs", headers=headers), 405, "method_not_allowed")
    # a spec with problems lists every issue
    r = await api.client.post("/v1/workflows", json={"spec": {"name": "x", "steps": []}}, headers=headers)
    body = problem(r, 422, "spec_invalid")
    assert body["issues"]
    r = await api.client.post("/v1/specs/validate", json={"yaml": "name: [unclosed"}, headers=headers)
    assert r.status_code == 200
    assert r.json()["valid"] is False
    # input that fails the workflow's input_schema
    await publish(api, "acme")
    r = await api.client.post(
        "/v1/runs", json={"workflow": "payout", "input": {"amount": "x"}}, headers=headers
    )
    problem(r, 422, "invalid_input")
    # the same idempotency key with a different input is a conflict; with the same one, the same run
    start = {"workflow": "payout", "input": {"amount": 3}, "idempotency_key": "once"}
    first = await api.client.post("/v1/runs", json=start, headers=headers)
    again = await api.client.post("/v1/runs", json=start, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    r = await api.client.post("/v1/runs", json={**start, "input": {"amount": 4}}, headers=headers)
    problem(r, 409, "conflict")
    # a rejection needs a reason; deciding twice is a conflict-free 404 (no longer pending)
    run_id = first.json()["id"]
    await api.wait_status(run_id, "acme", {"waiting"})
    r = await api.client.post(f"/v1/approvals/step:{run_id}:sign_off/reject", json={}, headers=headers)
    problem(r, 422, "invalid_input")
    r = await api.client.post(f"/v1/runs/{run_id}/resume", headers=headers)
    problem(r, 409, "invalid_state")


async def test_request_size_limit(api: Api) -> None:
    headers = {**api.auth("acme", "admin"), "content-type": "application/json"}
    limit = api.services.max_body_bytes
    big = b'{"workflow": "payout", "input": {"pad": "' + b"x" * limit + b'"}}'
    problem(await api.client.post("/v1/runs", content=big, headers=headers), 413, "payload_too_large")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit counts bytes as they arrive
        for _ in range(limit // 4096 + 2):
            yield b"x" * 4096

    r = await api.client.post("/v1/runs", content=chunks(), headers=headers)
    problem(r, 413, "payload_too_large")
    # just under the limit is fine (and the input is validated as usual)
    ok = await api.client.post("/v1/specs/validate", json={"yaml": "x" * (limit // 2)}, headers=headers)
    assert ok.status_code == 200


async def test_openapi_document_is_published(api: Api) -> None:
    r = await api.client.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.")
    paths = set(doc["paths"])
    for expected in (
        "/v1/runs",
        "/v1/runs/{run_id}",
        "/v1/runs/{run_id}/events",
        "/v1/approvals",
        "/v1/approvals/{approval_id}/edit",
        "/v1/workflows",
        "/v1/specs/validate",
        "/v1/audit/export",
        "/v1/policies/explain",
        "/v1/workflows/{name}/kpis",
        "/v1/budgets",
        "/v1/tools",
    ):
        assert expected in paths


async def test_text_the_database_cannot_store_is_a_4xx(store_url: str) -> None:
    """NUL characters, overlong names and unpaired surrogates: 4xx on SQLite and PostgreSQL."""
    from controltower.api import create_app

    from .conftest import make_services, seed

    svc = await make_services(store_url)
    tokens = await seed(svc)
    headers = {"Authorization": f"Bearer {tokens[('acme', 'admin')]}", "content-type": "application/json"}
    try:
        transport = httpx.ASGITransport(app=create_app(svc))
        async with httpx.AsyncClient(transport=transport, base_url="http://tower.test", headers=headers) as c:
            await publish(Api(svc, c, tokens), "acme")
            for url in (
                "/v1/runs?workflow=%00",
                "/v1/audit?actor=a%00b",
                "/v1/runs/run%00",
                "/v1/workflows/%00",
            ):
                r = await c.get(url)
                assert r.status_code < 500, (url, r.text)  # found nothing, or refused as input
            bodies = [
                b'{"workflow": "payout", "input": {"amount": 1}, "idempotency_key": "a\\u0000b"}',
                b'{"workflow": "payout", "input": {"amount": 1, "note": "\\ud800"}}',
                '{"workflow": "payout", "input": {"amount": 1, "s": "\ud800"}}'.encode(
                    "utf-8", "surrogatepass"
                ),
                b'{"workflow": "' + b"w" * 100 + b'", "input": {}}',
                b'{"workflow": "payout", "input": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
            ]
            for body in bodies:
                r = await c.post("/v1/runs", content=body)
                assert 400 <= r.status_code < 500, (body[:80], r.text)
                assert r.headers["content-type"] == PROBLEM
            r = await c.post(
                "/v1/runs", json={"workflow": "payout", "input": {"amount": 1, "s": "\U0001f600"}}
            )
            assert r.status_code == 201, r.text
            r = await c.post(
                "/v1/users", json={"username": "u" * 250, "password": "long enough", "roles": ["viewer"]}
            )
            assert 400 <= r.status_code < 500, r.text
    finally:
        await svc.engine.close()


async def test_session_changes_from_another_origin_are_refused(api: Api) -> None:
    r = await api.client.post(
        "/v1/auth/login", json={"tenant": "acme", "username": "admin-acme", "password": PASSWORD}
    )
    cookie = {"Cookie": f"tower_session={r.cookies['tower_session']}"}
    api.client.cookies.clear()
    body = {"scopes": ["*"], "ttl_seconds": 60}
    evil = await api.client.post(
        "/v1/tokens", json=body, headers={**cookie, "Origin": "https://evil.example"}
    )
    problem(evil, 403, "forbidden")
    same = await api.client.post("/v1/tokens", json=body, headers={**cookie, "Origin": "http://tower.test"})
    assert same.status_code == 201, same.text
    # reads are not changes; bearer tokens are not cookies
    assert (
        await api.client.get("/v1/me", headers={**cookie, "Origin": "https://evil.example"})
    ).status_code == 200
    r = await api.call(
        "POST", "/v1/tokens", "acme", "admin", json=body, headers={"Origin": "https://evil.example"}
    )
    assert r.status_code == 201


async def test_password_guessing_is_slowed_down(api: Api) -> None:
    wrong = {"tenant": "acme", "username": "admin-acme", "password": "guess"}
    codes = [(await api.client.post("/v1/auth/login", json=wrong)).status_code for _ in range(11)]
    assert codes == [401] * 10 + [429]
    r = await api.client.post("/v1/auth/login", json={**wrong, "password": PASSWORD})
    problem(r, 429, "rate_limited")  # even the right password waits out the window
    other = {"tenant": "acme", "username": "viewer-acme", "password": PASSWORD}
    assert (await api.client.post("/v1/auth/login", json=other)).status_code == 200
