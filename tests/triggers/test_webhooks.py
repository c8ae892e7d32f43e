"""Webhook triggers over real HTTP: signatures, replay window, idempotent deliveries, schemas, tenants."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from tests.triggers.helpers import Services, runs_of, spec

from controltower.store import tables as t
from controltower.triggers.signing import WebhookError, sign, verify

SECRET = "whsec-test-0123456789"
SCHEMA = {"type": "object", "required": ["ticket"], "properties": {"ticket": {"type": "string"}}}


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_HOOK_SECRET", SECRET)


async def publish(services: Services, name: str = "hooked", **trigger: Any) -> None:
    hook = {"kind": "webhook", "secret_env": "TEST_HOOK_SECRET", **trigger}
    await services.engine.publish(spec(name, triggers=[hook], input_schema=SCHEMA))


async def post(url: str, body: Any, *, secret: str = SECRET, **kw: Any) -> httpx.Response:
    raw, headers = sign(secret, body, **kw)
    async with httpx.AsyncClient() as client:
        return await client.post(url, content=raw, headers=headers)


async def test_a_signed_delivery_starts_one_run_and_a_repeat_returns_it(
    services: Services, webhook_url: str
) -> None:
    await publish(services)
    url = f"{webhook_url}/v1/webhooks/hooked"
    first = await post(url, {"ticket": "T-1"}, delivery_id="d-1")
    assert first.status_code == 202, first.text
    run_id = first.json()["run_id"]
    assert first.json()["duplicate"] is False
    again = await post(url, {"ticket": "T-1"}, delivery_id="d-1")
    assert again.status_code == 200
    assert again.json() == {"workflow": "hooked", "delivery_id": "d-1", "run_id": run_id, "duplicate": True}
    run = await services.engine.wait(run_id, timeout=10)
    assert run.status == "completed"
    assert run.input == {"ticket": "T-1"}
    assert run.tenant == "default"
    assert len(await runs_of(services.store, "hooked")) == 1


async def test_concurrent_repeats_of_one_delivery_start_one_run(services: Services, webhook_url: str) -> None:
    await publish(services)
    url = f"{webhook_url}/v1/webhooks/hooked"
    answers = await asyncio.gather(*(post(url, {"ticket": "T-2"}, delivery_id="same") for _ in range(8)))
    assert {r.status_code for r in answers} <= {200, 202}
    assert len({r.json()["run_id"] for r in answers}) == 1
    assert len(await runs_of(services.store, "hooked")) == 1


async def test_same_delivery_id_with_another_body_is_a_conflict(services: Services, webhook_url: str) -> None:
    await publish(services)
    url = f"{webhook_url}/v1/webhooks/hooked"
    assert (await post(url, {"ticket": "A"}, delivery_id="d-9")).status_code == 202
    clash = await post(url, {"ticket": "B"}, delivery_id="d-9")
    assert clash.status_code == 409
    assert clash.headers["content-type"].startswith("application/problem+json")
    assert clash.json()["code"] == "delivery_conflict"
    assert len(await runs_of(services.store, "hooked")) == 1


BAD_SIGNATURES = [
    ("secret", "bad_signature"),
    ("stale", "stale_timestamp"),
    ("future", "stale_timestamp"),
    ("missing", "signature_missing"),
    ("body", "bad_signature"),
]


async def test_bad_signatures_are_401_and_start_nothing(services: Services, webhook_url: str) -> None:
    await publish(services)
    url = f"{webhook_url}/v1/webhooks/hooked"
    for tamper, code in BAD_SIGNATURES:
        raw, headers = sign(
            "wrong-secret" if tamper == "secret" else SECRET,
            {"ticket": "T-3"},
            timestamp=int(time.time()) + {"stale": -301, "future": 400}.get(tamper, 0),
            delivery_id="d-3",
        )
        if tamper == "missing":
            del headers["X-Tower-Signature"]
        if tamper == "body":
            raw = raw.replace(b"T-3", b"T-4")
        async with httpx.AsyncClient() as client:
            answer = await client.post(url, content=raw, headers=headers)
        assert answer.status_code == 401, tamper
        assert answer.headers["content-type"].startswith("application/problem+json")
        assert (answer.json()["code"], answer.json()["status"]) == (code, 401)
    assert await runs_of(services.store, "hooked") == []


async def test_payloads_are_checked_against_the_schemas(services: Services, webhook_url: str) -> None:
    trigger_schema = {"type": "object", "properties": {"ticket": {"type": "string", "pattern": "^T-"}}}
    await publish(services, input_schema=trigger_schema)
    url = f"{webhook_url}/v1/webhooks/hooked"
    wrong_type = await post(url, {"ticket": 7})  # the workflow's schema
    assert wrong_type.status_code == 422
    assert wrong_type.json()["code"] == "invalid_payload"
    bad_pattern = await post(url, {"ticket": "X-1"})  # the trigger's own schema
    assert bad_pattern.status_code == 422
    assert "trigger's schema" in bad_pattern.json()["detail"]
    not_json = await post(url, b"{nope")
    assert not_json.status_code == 422
    assert not_json.json()["code"] == "invalid_json"
    assert await runs_of(services.store, "hooked") == []


async def test_too_large_bodies_are_413(services: Services, webhook_url: str) -> None:
    await publish(services, max_bytes=100)
    answer = await post(f"{webhook_url}/v1/webhooks/hooked", {"ticket": "T-" + "x" * 200})
    assert answer.status_code == 413
    assert answer.json()["code"] == "payload_too_large"


async def test_unknown_endpoints_and_workflows_without_webhooks_are_404(
    services: Services, webhook_url: str
) -> None:
    await services.engine.publish(spec("manual-only"))
    for name in ("nope", "manual-only"):
        answer = await post(f"{webhook_url}/v1/webhooks/{name}", {"ticket": "T"})
        assert answer.status_code == 404
        assert answer.json()["code"] == "not_found"


async def test_a_custom_path_names_the_endpoint(services: Services, webhook_url: str) -> None:
    await publish(services, path="tickets-in")
    answer = await post(f"{webhook_url}/v1/webhooks/tickets-in", {"ticket": "T-5"})
    assert answer.status_code == 202
    assert (await services.engine.get(answer.json()["run_id"])).workflow == "hooked"


async def test_without_a_configured_secret_deliveries_are_refused_and_the_secret_never_logged(
    services: Services, webhook_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await publish(services)
    url = f"{webhook_url}/v1/webhooks/hooked"
    assert (await post(url, {"ticket": "T-6"})).status_code == 202
    monkeypatch.delenv("TEST_HOOK_SECRET")
    refused = await post(url, {"ticket": "T-7"})
    assert refused.status_code == 503
    assert refused.json()["code"] == "webhook_not_configured"
    assert SECRET not in caplog.text
    assert SECRET not in refused.text


async def test_runs_start_in_the_tenant_owning_the_workflow(services: Services, webhook_url: str) -> None:
    await publish(services, name="acme-hook")

    def own(conn: sa.Connection) -> None:
        conn.execute(t.workflow_owners.insert().values(workflow="acme-hook", tenant="acme", created_at=0.0))

    await services.store.run(own)
    answer = await post(f"{webhook_url}/v1/webhooks/acme-hook", {"ticket": "T-8"}, delivery_id="x")
    run = await services.engine.get(answer.json()["run_id"])
    assert run.tenant == "acme"

    def deliveries(conn: sa.Connection) -> list[tuple[str, str]]:
        d = t.webhook_deliveries
        return [(r.tenant, r.delivery_id) for r in conn.execute(sa.select(d.c.tenant, d.c.delivery_id))]

    assert await services.store.run(deliveries) == [("acme", "x")]


def test_verify_accepts_any_of_several_signatures_during_rotation() -> None:
    raw, headers = sign("new", b'{"a":1}', timestamp=1000)
    both = "sha256=deadbeef, " + headers["X-Tower-Signature"]
    assert verify("new", raw, "1000", both, tolerance=300, now=1100) == 1000
    with pytest.raises(WebhookError) as info:
        verify("new", raw, "1000", both, tolerance=30, now=1100)
    assert info.value.code == "stale_timestamp"
    assert json.loads(raw) == {"a": 1}
