"""Webhook triggers: ``POST /v1/webhooks/{workflow}`` starts a run from a signed JSON body.

The sender signs ``"{timestamp}.{body}"`` with HMAC-SHA256 under the secret held in the env var
the spec names (``secret_env``) and sends three headers:

- ``X-Tower-Timestamp``: Unix seconds; outside ``tolerance`` of now the request is a replay (401);
- ``X-Tower-Signature``: ``sha256=<hex>`` (several, comma-separated, while rotating secrets);
- ``X-Tower-Delivery``: the delivery id; a repeat returns the first run and starts nothing
  (default: a digest of timestamp and body, so a verbatim resend is also a repeat).

The run starts in the tenant that owns the workflow, with idempotency key ``webhook:<delivery>``,
so even two concurrent deliveries of one id (in two processes) start one run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from http import HTTPStatus
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from controltower.spec.errors import ConflictError, InvalidInputError, NotFoundError, StoreError
from controltower.spec.models import WebhookTrigger, WorkflowSpec
from controltower.store import SqlStore
from controltower.store import tables as t
from controltower.triggers._common import TriggerServices, latest_published, workflow_tenant
from controltower.triggers.signing import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookError,
    sign,
    signature,
    verify,
)

__all__ = ["WebhookError", "build_router", "sign", "signature", "verify"]

log = logging.getLogger("controltower.triggers.webhooks")

PROBLEM_TYPE = "urn:controltower:problem:"  # as the API's problem documents
MAX_DELIVERY_ID = 200


# -- the endpoint ------------------------------------------------------------------------------


def problem(status: int, code: str, detail: str, *, hint: str | None = None, **extra: Any) -> JSONResponse:
    """An RFC 9457 problem document with a stable ``code``."""
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE + code,
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if hint:
        body["hint"] = hint
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type="application/problem+json")


def _services(request: Request) -> TriggerServices:
    services: TriggerServices = request.app.state.services
    return services


def build_router() -> APIRouter:
    """The router serving ``POST /v1/webhooks/{workflow}`` (uses ``request.app.state.services``)."""
    router = APIRouter(tags=["webhooks"])

    @router.post(
        "/v1/webhooks/{workflow}",
        status_code=202,
        summary="Start a run from a signed webhook delivery",
        responses={
            200: {"description": "A repeated delivery: the first run, nothing new started"},
            401: {"description": "Missing, stale or wrong signature"},
            404: {"description": "No workflow with a webhook trigger by that name"},
            409: {"description": "The delivery id was used with a different body"},
            413: {"description": "The body is larger than the trigger allows"},
            422: {"description": "The body is not JSON or does not match the schema"},
        },
    )
    async def receive_webhook(workflow: str, request: Request) -> JSONResponse:
        try:
            return await _receive(_services(request), workflow, request)
        except WebhookError as exc:
            return problem(exc.status, exc.code, exc.message, hint=exc.hint)

    return router


async def _receive(services: TriggerServices, endpoint: str, request: Request) -> JSONResponse:
    spec, trigger = await _resolve(services.store, endpoint)
    body = await _read_body(request, trigger.max_bytes)
    secret = os.environ.get(trigger.secret_env) if trigger.secret_env else None
    if not secret:
        log.error(
            "webhook %s: no signing secret (secret_env=%s is unset); refusing deliveries",
            spec.name,
            trigger.secret_env,
        )
        raise WebhookError(
            503,
            "webhook_not_configured",
            f"the webhook of {endpoint!r} has no signing secret configured on the server",
            hint="the operator must set the env var named by the trigger's secret_env",
        )
    headers = request.headers
    offered = headers.get(SIGNATURE_HEADER)
    ts = verify(secret, body, headers.get(TIMESTAMP_HEADER), offered, tolerance=trigger.tolerance)
    digest = hashlib.sha256(body).hexdigest()
    delivery = (headers.get(DELIVERY_HEADER) or "").strip() or "sig-" + hashlib.sha256(
        f"{ts}.".encode() + body
    ).hexdigest()[:40]
    if len(delivery) > MAX_DELIVERY_ID:
        raise WebhookError(422, "bad_delivery_id", f"{DELIVERY_HEADER} is longer than {MAX_DELIVERY_ID}")
    payload = _parse(body, trigger)
    tenant = await workflow_tenant(services.store, spec.name)

    first = await _delivery(services.store, tenant, spec.name, delivery)
    if first is not None:
        return _repeat(first, digest, spec.name, delivery)
    try:
        run_id = await services.engine.start(
            spec.name, payload, idempotency_key=f"webhook:{delivery}", tenant=tenant
        )
    except InvalidInputError as exc:
        raise WebhookError(422, "invalid_payload", exc.message, hint=exc.hint) from None
    except NotFoundError as exc:
        raise WebhookError(404, "not_found", exc.message) from None
    except ConflictError as exc:
        raise WebhookError(409, "conflict", exc.message, hint=exc.hint) from None
    except StoreError as exc:
        log.error("webhook %s: store unavailable: %s", spec.name, exc)
        raise WebhookError(503, "store_unavailable", "the store is unavailable; retry later") from None
    first = await _record(services.store, tenant, spec.name, delivery, digest, run_id)
    if first[1] != run_id or first[0] != digest:
        return _repeat(first, digest, spec.name, delivery)
    log.info("webhook %s: delivery %s started run %s", spec.name, delivery, run_id)
    return JSONResponse(
        {"workflow": spec.name, "delivery_id": delivery, "run_id": run_id, "duplicate": False},
        status_code=202,
    )


def _repeat(first: tuple[str, str], digest: str, workflow: str, delivery: str) -> JSONResponse:
    body_digest, run_id = first
    if body_digest != digest:
        raise WebhookError(
            409,
            "delivery_conflict",
            f"delivery {delivery!r} was already received with a different body (run {run_id})",
            hint="use a new delivery id for a new event",
        )
    return JSONResponse({"workflow": workflow, "delivery_id": delivery, "run_id": run_id, "duplicate": True})


async def _resolve(store: SqlStore, endpoint: str) -> tuple[WorkflowSpec, WebhookTrigger]:
    """The workflow behind an endpoint: a webhook trigger's ``path``, else the workflow's name."""
    unknown = WebhookError(404, "not_found", f"no workflow takes webhooks at {endpoint!r}")
    if len(endpoint) > 100:
        raise unknown
    record = await store.get_workflow(endpoint)
    if record is not None:
        spec = WorkflowSpec.model_validate(record.spec)
        for trig in spec.triggers:
            if isinstance(trig, WebhookTrigger) and trig.path in (None, endpoint):
                return spec, trig
    for published in await latest_published(store):
        for trig in published.spec.triggers:
            if isinstance(trig, WebhookTrigger) and trig.path == endpoint:
                return published.spec, trig
    raise unknown


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = WebhookError(413, "payload_too_large", f"the body is larger than {limit} bytes")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(body: bytes, trigger: WebhookTrigger) -> Any:
    try:
        payload = json.loads(body) if body.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WebhookError(422, "invalid_json", f"the body is not JSON: {exc}") from None
    if trigger.input_schema is not None:
        error = best_match(Draft202012Validator(trigger.input_schema).iter_errors(payload))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "<root>"
            message = f"the body does not match the trigger's schema at {where}: {error.message}"
            raise WebhookError(422, "invalid_payload", message)
    return payload


async def _delivery(store: SqlStore, tenant: str, workflow: str, delivery: str) -> tuple[str, str] | None:
    def fn(conn: sa.Connection) -> tuple[str, str] | None:
        d = t.webhook_deliveries
        row = conn.execute(
            sa.select(d.c.body_digest, d.c.run_id).where(
                d.c.tenant == tenant, d.c.workflow == workflow, d.c.delivery_id == delivery
            )
        ).first()
        return None if row is None else (row[0], row[1])

    return await store.run(fn)


async def _record(
    store: SqlStore, tenant: str, workflow: str, delivery: str, digest: str, run_id: str
) -> tuple[str, str]:
    """Record the delivery (first writer wins) and return what is recorded: (body digest, run)."""
    row = {
        "tenant": tenant,
        "workflow": workflow,
        "delivery_id": delivery,
        "body_digest": digest,
        "run_id": run_id,
        "received_at": time.time(),
    }

    def fn(conn: sa.Connection) -> tuple[str, str]:
        d = t.webhook_deliveries
        conn.execute(store.insert(d).values(**row).on_conflict_do_nothing())
        got = conn.execute(
            sa.select(d.c.body_digest, d.c.run_id).where(
                d.c.tenant == tenant, d.c.workflow == workflow, d.c.delivery_id == delivery
            )
        ).one()
        return got[0], got[1]

    return await store.run(fn)
