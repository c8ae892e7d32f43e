"""Every endpoint against every role: allowed roles get past authorisation, others get 403."""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import ROLES, SPEC, Api, publish

MISSING_RUN = "run_00000000000000000000000000"
MISSING_APR = "apr_00000000000000000000000000"

ALL = set(ROLES)
READERS = ALL
OPERATORS = {"admin", "operator"}
DECIDERS = {"admin", "operator", "approver"}
ADMINS = {"admin"}

# (method, path, json body, roles allowed). Actions on missing objects: allowed roles get 404,
# which shows the permission check passed (and comes first).
MATRIX: list[tuple[str, str, Any, set[str]]] = [
    ("GET", "/v1/me", None, ALL),
    ("GET", "/v1/workflows", None, READERS),
    ("GET", "/v1/workflows/payout", None, READERS),
    ("GET", "/v1/workflows/payout/versions", None, READERS),
    ("GET", "/v1/workflows/payout/versions/1", None, READERS),
    ("GET", "/v1/workflows/payout/kpis", None, READERS),
    ("POST", "/v1/specs/validate", {"spec": SPEC}, READERS),
    ("POST", "/v1/workflows", {"spec": SPEC}, OPERATORS),
    ("GET", "/v1/runs", None, READERS),
    ("GET", "/v1/runs/{run}", None, READERS),
    ("POST", "/v1/runs", {"workflow": "nope", "input": {}}, OPERATORS),
    ("POST", f"/v1/runs/{MISSING_RUN}/cancel", {}, OPERATORS),
    ("POST", f"/v1/runs/{MISSING_RUN}/resume", None, OPERATORS),
    ("POST", f"/v1/runs/{MISSING_RUN}/signals", {"event": "go"}, OPERATORS),
    ("POST", f"/v1/runs/{MISSING_RUN}/approvals/sign_off", {"approved": True}, DECIDERS),
    ("GET", "/v1/approvals", None, READERS),
    ("GET", "/v1/approvals/{approval}", None, READERS),
    ("POST", f"/v1/approvals/{MISSING_APR}/approve", {}, DECIDERS),
    ("POST", f"/v1/approvals/{MISSING_APR}/edit", {"args": {}}, DECIDERS),
    ("POST", f"/v1/approvals/{MISSING_APR}/reject", {"reason": "no"}, DECIDERS),
    ("GET", "/v1/tools", None, READERS),
    ("GET", "/v1/tools/payout.pay/versions", None, READERS),
    ("GET", "/v1/policies", None, READERS),
    ("POST", "/v1/policies/explain", {"tool": "payout.pay", "workflow": "payout"}, READERS),
    ("GET", "/v1/audit", None, READERS),
    ("GET", "/v1/audit/verify", None, READERS),
    ("GET", "/v1/audit/export", None, ADMINS),
    ("GET", "/v1/budgets", None, READERS),
    ("GET", "/v1/tokens", None, ALL),
    ("GET", "/v1/users", None, ADMINS),
    ("POST", "/v1/users", {"username": "new", "password": "long enough", "roles": ["viewer"]}, ADMINS),
    ("POST", "/v1/users/nobody/disable", None, ADMINS),
]


@pytest.fixture
async def waiting(api: Api) -> dict[str, str]:
    await publish(api, "acme")
    r = await api.call(
        "POST", "/v1/runs", "acme", "operator", json={"workflow": "payout", "input": {"amount": 1}}
    )
    run_id = r.json()["id"]
    await api.wait_status(run_id, "acme", {"waiting"})
    approval = f"step:{run_id}:sign_off"
    return {"run": run_id, "approval": approval}


async def test_every_endpoint_and_role(api: Api, waiting: dict[str, str]) -> None:
    problems = []
    for method, path, body, allowed in MATRIX:
        url = path.format(**waiting)
        for role in ROLES:
            r = await api.call(method, url, "acme", role, json=body)
            if role in allowed:
                ok = r.status_code < 400 or (
                    r.status_code in (404, 409, 422) and r.json()["code"] != "forbidden"
                )
            else:
                ok = r.status_code == 403 and r.json()["code"] == "forbidden"
            assert r.status_code < 500, (method, url, role, r.text)
            if not ok:
                problems.append((method, url, role, r.status_code, r.text[:200]))
    assert problems == []


async def test_approval_groups_restrict_who_decides(api: Api, waiting: dict[str, str]) -> None:
    # the approval step is for group "managers": the admin may, an approver outside it may not
    extra = await api.services.auth.create_user("acme", "outsider", "long password", ["approver"], ["legal"])
    token = await api.services.auth.issue_token(extra, ["*"], 600)
    url = f"/v1/approvals/{waiting['approval']}/approve"
    r = await api.client.post(url, json={}, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 403
    assert r.json()["code"] == "forbidden"
    listed = (await api.client.get("/v1/approvals", headers={"Authorization": f"Bearer {token}"})).json()
    assert [a["may_decide"] for a in listed["items"]] == [False]
    r = await api.call("POST", url, "acme", "approver", json={"reason": "fine"})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "approved"
    r = await api.call("POST", url, "acme", "admin", json={})
    assert r.status_code == 404  # decided: no longer pending


async def test_token_scopes_narrow_roles(api: Api) -> None:
    r = await api.call(
        "POST", "/v1/tokens", "acme", "admin", json={"scopes": ["runs:read"], "ttl_seconds": 60}
    )
    assert r.status_code == 201, r.text
    issued = r.json()
    assert issued["token"].startswith(issued["id"] + ".")
    headers = {"Authorization": f"Bearer {issued['token']}"}
    assert (await api.client.get("/v1/runs", headers=headers)).status_code == 200
    r = await api.client.get("/v1/users", headers=headers)
    assert (r.status_code, r.json()["code"]) == (403, "forbidden")
    # a viewer cannot mint a token wider than its role: scopes never add permissions
    r = await api.call("POST", "/v1/tokens", "acme", "viewer", json={"scopes": ["*"]})
    assert r.status_code == 422  # a token cannot issue tokens without tokens:manage
    r = await api.call("POST", "/v1/tokens", "acme", "admin", json={"scopes": ["runs:fly"]})
    assert (r.status_code, r.json()["code"]) == (422, "invalid_input")
    listed = (await api.call("GET", "/v1/tokens", "acme", "admin")).json()["items"]
    assert all("token" not in x for x in listed)
    assert issued["id"] in {x["id"] for x in listed}
